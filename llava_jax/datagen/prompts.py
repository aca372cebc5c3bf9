"""Prompt text for instruction generation (our own wording) and the instruction lists.

Each kind has a system message that fixes the reply format the parser in instruct.py expects,
plus hand-written few-shot examples (context -> reply). The examples describe invented scenes.
"""
from __future__ import annotations

from .context import Box, format_context

KINDS = ("conversation", "detail", "complex")

# Appended to the first human turn of detailed-description samples (one picked per image).
DETAIL_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Give a thorough description of what this picture shows.",
    "Walk me through everything you can see in this image.",
    "Write a detailed account of the scene in the photo.",
    "What is going on in this picture? Please be as detailed as you can.",
    "Provide an in-depth description of the image.",
    "Explain the contents of this photo carefully and completely.",
    "Paint a full picture in words of what appears in this image.",
    "Tell me about this image, covering the objects, people and setting.",
    "Offer a comprehensive description of the visual content here.",
    "Describe the scene below, including where things are and what they are doing.",
    "Could you describe this photograph in rich detail?",
    "Break down the elements of this image and describe each of them.",
    "Narrate what is visible in this picture from one side to the other.",
    "Give an elaborate description of the image and its notable features.",
    "Study the image and describe everything of interest in it.",
)

# Stage-1 (caption) instructions, one picked per image-caption pair.
BRIEF_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "Summarize the photo in a few words.",
    "What does this image show? Answer in one sentence.",
    "Write a concise description of the image.",
    "Provide a brief summary of the visual content.",
    "Caption this photo.",
    "In one line, what is in the picture?",
    "Offer a quick description of this image.",
    "Sum up the scene in a short sentence.",
    "Tell me briefly what you see.",
)

_GROUNDING = (
    "You cannot see the image. Instead you are given what annotators wrote about it: several "
    "captions, and a list of annotated objects with their bounding boxes. A box is written as "
    "category: [x1, y1, x2, y2], the top-left and bottom-right corners as fractions of the image "
    "width and height, measured from the top-left corner. Write as if you were looking at the "
    "picture yourself: never mention captions, annotations, boxes or coordinates, and never use "
    "the numbers; turn positions into ordinary words (left, in the background, next to ...). "
    "Only state what the information supports; do not invent details."
)

SYSTEM_PROMPTS = {
    "conversation": (
        "You are an AI visual assistant chatting with a person about a photo. " + _GROUNDING + "\n\n"
        "Write a conversation of three to five exchanges. The person asks varied questions about the "
        "visible content: what objects are there, how many, what they are doing, where they are, "
        "what colors or materials they have. Ask only questions that the information answers with "
        "confidence. Answers are natural and helpful, in the voice of an assistant who sees the photo.\n\n"
        "Format: each exchange is a line starting with 'Question:' followed by a line starting with "
        "'Answer:'. Put a blank line between exchanges. Write nothing else."
    ),
    "detail": (
        "You are an AI visual assistant describing a photo. " + _GROUNDING + "\n\n"
        "Write one detailed description of the image in one to three paragraphs: the overall scene, "
        "the main objects and people, what they are doing, and how they are arranged relative to "
        "each other. Reply with the description only, without a title or preamble."
    ),
    "complex": (
        "You are an AI visual assistant reasoning about a photo. " + _GROUNDING + "\n\n"
        "Write one question about the image that takes more than recognition to answer: why "
        "something is happening, what might happen next, what a person should be careful about, "
        "or what the scene suggests about its circumstances. Then answer it with clear, step-by-step "
        "reasoning grounded in the visible content.\n\n"
        "Format: one line starting with 'Question:', then the answer starting with 'Answer:'. "
        "Write nothing else."
    ),
}

_EXAMPLE_KITCHEN = format_context(
    ["Two cooks in white jackets prepare food in a restaurant kitchen.",
     "A man chops vegetables while a woman stirs a large pot.",
     "Busy kitchen with stainless steel counters and hanging pans.",
     "Two people cooking next to a stove in a commercial kitchen.",
     "A chef slices carrots on a cutting board beside a coworker at the stove."],
    [Box("person", 0.052, 0.118, 0.391, 0.987), Box("person", 0.574, 0.095, 0.912, 0.994),
     Box("knife", 0.301, 0.602, 0.388, 0.655), Box("carrot", 0.221, 0.640, 0.297, 0.671),
     Box("oven", 0.603, 0.612, 0.998, 0.999), Box("bowl", 0.402, 0.580, 0.489, 0.642)])

_EXAMPLE_BEACH = format_context(
    ["A dog runs along the beach with a frisbee in its mouth.",
     "A brown dog carrying a disc on the sand near the waves.",
     "Dog playing fetch at the seashore on a sunny day.",
     "A dog trots across wet sand, a red frisbee clenched in its jaws.",
     "A person watches a dog return a frisbee at the beach."],
    [Box("dog", 0.315, 0.452, 0.588, 0.803), Box("frisbee", 0.517, 0.498, 0.604, 0.547),
     Box("person", 0.861, 0.224, 0.947, 0.706)])

FEW_SHOT = {
    "conversation": [
        (_EXAMPLE_KITCHEN,
         "Question: How many people are working in the kitchen?\n"
         "Answer: Two people are working there, a man and a woman, both wearing white cook's jackets.\n\n"
         "Question: What is the man on the left doing?\n"
         "Answer: He is chopping vegetables, slicing carrots on a cutting board with a knife.\n\n"
         "Question: What is the woman doing?\n"
         "Answer: She is standing at the stove on the right side of the kitchen, stirring a large pot.\n\n"
         "Question: What kind of kitchen is this?\n"
         "Answer: It looks like a commercial restaurant kitchen, with stainless steel counters, "
         "an oven and pans hanging overhead."),
    ],
    "detail": [
        (_EXAMPLE_BEACH,
         "A brown dog trots across the wet sand of a beach on a sunny day, holding a red frisbee "
         "firmly in its mouth. It is in the middle of the frame, heading back after a throw, with "
         "the waves rolling in behind it. On the far right a person stands watching the dog, "
         "apparently the one who threw the disc. The open shoreline and bright light give the "
         "scene a relaxed, playful feeling."),
    ],
    "complex": [
        (_EXAMPLE_KITCHEN,
         "Question: What should the cook on the left pay attention to while he works?\n"
         "Answer: He is cutting carrots with a sharp knife in a crowded, busy kitchen, so he needs "
         "to keep his fingers clear of the blade and stay focused on the board. His coworker is "
         "working at a hot stove close by, so he should also be aware of her movements and of the "
         "hot oven to avoid bumping into her or touching a hot surface while handling the knife."),
    ],
}


def build_messages(kind: str, context_text: str) -> list[dict]:
    """OpenAI chat messages for one (image, kind): system, few-shot pairs, then the real context."""
    if kind not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown instruction kind {kind!r}; expected one of {KINDS}")
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[kind]}]
    for example_context, example_reply in FEW_SHOT[kind]:
        messages.append({"role": "user", "content": example_context})
        messages.append({"role": "assistant", "content": example_reply})
    messages.append({"role": "user", "content": context_text})
    return messages


def kind_of_messages(messages: list[dict]) -> str:
    """Which kind a message list was built for (lets an offline backend answer in the right format)."""
    system = messages[0]["content"] if messages and messages[0].get("role") == "system" else None
    for kind, prompt in SYSTEM_PROMPTS.items():
        if system == prompt:
            return kind
    raise ValueError("messages were not built by llava_jax.datagen.prompts.build_messages")
