"""Conversation templates, prompt rendering, and tokenization with label masks.

The templates reproduce the reference's strings exactly (see the `TEMPLATES` table). `encode` turns a
LLaVA JSON `conversations` list into `input_ids` and `labels`:

- The rendered text is tokenized the way the reference tokenizes it (split at `<image>`, each chunk
  tokenized on its own, BOS only on the first chunk), so with `num_image_tokens=1` the ids line up
  token for token with the reference's single-placeholder form; each `<image>` becomes
  `num_image_tokens` copies of `image_token_id` (the llava-hf convention).
- Labels come from character spans: while rendering we record which characters are targets (each
  assistant answer plus the separator that closes it), and a token is a target when the character it
  starts at is. The reference instead re-tokenizes pieces of the prompt and counts tokens, which
  silently drifts with the tokenizer's `legacy` flag; span bookkeeping cannot drift.
- A sample that ends up with no targets raises `EmptyTargets` instead of training on nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

HUMAN, ASSISTANT = 0, 1
_ROLE_OF_SPEAKER = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT}


# ----- errors: every reason a record cannot become a training sample ---------------------------

class BadSample(ValueError):
    """A record that cannot become a training sample. `reason` is the key it is counted under."""

    reason = "bad_sample"

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedConversation(BadSample):
    reason = "malformed_record"


class RolesOutOfOrder(BadSample):
    reason = "roles_out_of_order"


class EmptyAnswer(BadSample):
    reason = "empty_answer"


class EmptyTargets(BadSample):
    """No target token is left (e.g. truncation cut every answer away)."""

    reason = "empty_targets"


class TooLong(BadSample):
    """Truncation to max_length would cut through an image's placeholder tokens."""

    reason = "too_long"


# ----- templates ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation format. style 'two': turns end with sep / sep2 alternately (vicuna_v1);
    'single': every turn ends with sep (v0); 'plain': "<image>" + caption + sep (stage 1)."""

    name: str
    system: str
    roles: tuple
    style: str
    sep: str
    sep2: str = ""

    def turn_end(self, index: int) -> str:
        if self.style == "two":
            return self.sep if index % 2 == 0 else self.sep2
        return self.sep


_SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                "gives helpful, detailed, and polite answers to the user's questions.")
_SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the human's questions.")

TEMPLATES = {
    "plain": Template("plain", "", ("", ""), "plain", "\n"),
    "v0": Template("v0", _SYSTEM_HUMAN, ("Human", "Assistant"), "single", "###"),
    "vicuna_v1": Template("vicuna_v1", _SYSTEM_USER, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_v1": Template("llava_v1", _SYSTEM_HUMAN, ("USER", "ASSISTANT"), "two", " ", "</s>"),
}
ALIASES = {"llava_v0": "v0", "v1": "vicuna_v1"}


def get_template(template) -> Template:
    if isinstance(template, Template):
        return template
    name = ALIASES.get(template, template)
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; expected one of "
                         f"{sorted(TEMPLATES) + sorted(ALIASES)}")
    return TEMPLATES[name]


# ----- turns ----------------------------------------------------------------------------------

def normalize_image_turn(text: str) -> str:
    """The reference's rule: a turn mentioning <image> becomes "<image>\\n" + the rest, stripped."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    return IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()


def parse_turns(conversations: Sequence[dict]) -> list:
    """LLaVA JSON `conversations` -> [(role, text)], validated: alternating human/gpt, starting with
    human, non-empty answers, image turns normalized."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise MalformedConversation(f"'conversations' must be a non-empty list, found {conversations!r:.80}")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise MalformedConversation(f"turn {i} must be a dict with 'from' and 'value', found {turn!r:.80}")
        speaker, text = turn["from"], turn["value"]
        role = _ROLE_OF_SPEAKER.get(str(speaker).lower())
        if role is None:
            raise MalformedConversation(f"turn {i} has unknown speaker {speaker!r}; expected "
                                        f"{sorted(_ROLE_OF_SPEAKER)}")
        if not isinstance(text, str):
            raise MalformedConversation(f"turn {i} value must be a string, found {type(text).__name__}")
        if role != i % 2:
            expected = "human" if i % 2 == 0 else "gpt"
            raise RolesOutOfOrder(f"turn {i} is from {speaker!r}, expected {expected!r} "
                                  f"(turns alternate, starting with human)")
        if role == ASSISTANT and not text.strip():
            raise EmptyAnswer(f"turn {i} (gpt) is empty")
        turns.append((role, normalize_image_turn(text)))
    return turns


# ----- rendering ------------------------------------------------------------------------------

def _pieces(template: Template, turns, generation: bool) -> list:
    """The rendered prompt as [(text, is_target)]; joining the texts gives the prompt string."""
    t = template
    if t.style == "plain":
        pieces = []
        for role, text in turns:
            if role == HUMAN:
                # Stage-1 data keeps only the image from the instruction (reference: preprocess_plain).
                pieces.append((IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in text else text, False))
            else:
                pieces.append((text + t.sep, True))
        return pieces
    pieces = [(t.system + t.sep, False)]
    for i, (role, text) in enumerate(turns):
        name = t.roles[role]
        if role == HUMAN:
            pieces.append((f"{name}: {text}{t.turn_end(i)}", False))
        else:
            # The space after "ASSISTANT:" starts the target: it is the first character of the answer's
            # first token, and the generation prompt ends with "ASSISTANT:" without it.
            pieces.append((f"{name}:", False))
            pieces.append((f" {text}{t.turn_end(i)}", True))
    if generation:
        pieces.append((f"{t.roles[ASSISTANT]}:", False))
    return pieces


def render(conversations: Sequence[dict], template="vicuna_v1") -> str:
    """The training text of a LLaVA JSON conversation."""
    return "".join(text for text, _ in _pieces(get_template(template), parse_turns(conversations), False))


def generation_prompt(conversations: Sequence[dict], template="vicuna_v1") -> str:
    """The prompt for generating the next answer: the conversation so far (ending with a human turn)
    followed by the assistant role, e.g. "...questions. USER: <image>\\nWhat is shown? ASSISTANT:"."""
    t = get_template(template)
    turns = parse_turns(conversations)
    if turns[-1][0] != HUMAN:
        raise RolesOutOfOrder("a generation prompt needs a conversation that ends with a human turn")
    if t.style == "plain":
        return "".join(text for text, _ in _pieces(t, turns[-1:], False))
    return "".join(text for text, _ in _pieces(t, turns, True))


# ----- tokenization ---------------------------------------------------------------------------

def _bos_ids(tokenizer) -> list:
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [ids[0]] if ids and ids[0] == tokenizer.bos_token_id else []


def _tokenize_with_spans(text: str, target_spans, tokenizer, image_token_id: int, num_image_tokens: int):
    """Tokenize like the reference's tokenizer_image_token, expanding each <image>; a token is a target
    when its first character lies in one of `target_spans` (character ranges of `text`)."""
    is_target_char = np.zeros(len(text) + 1, bool)
    for start, end in target_spans:
        is_target_char[start:end] = True
    ids = _bos_ids(tokenizer)
    targets = [False] * len(ids)
    image_positions = []
    chunk_start = 0
    chunks = text.split(IMAGE_PLACEHOLDER)
    for k, chunk in enumerate(chunks):
        if k > 0:
            image_positions.append(len(ids))
            ids += [image_token_id] * num_image_tokens
            targets += [False] * num_image_tokens
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            targets += [bool(is_target_char[chunk_start + s]) for s, _ in enc["offset_mapping"]]
        chunk_start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, targets, image_positions


def encode(conversations: Sequence[dict], tokenizer, template="vicuna_v1", image_token_id: int = 32000,
           num_image_tokens: int = 576, max_length: Optional[int] = None) -> dict:
    """Tokenize a LLaVA JSON conversation for training -> {'input_ids', 'labels'} (int32 numpy).

    Targets are every assistant answer plus the separator closing it ("</s>" for vicuna_v1, "###" for
    v0, "\\n" for plain); everything else is IGNORE_INDEX. With `max_length` the sample is truncated
    (image tokens count); truncation through an image raises TooLong, and a sample without any target
    raises EmptyTargets. Needs a fast (tokenizers-backed) tokenizer for character offsets.
    """
    t = get_template(template)
    turns = parse_turns(conversations)
    if t.style == "plain" and (len(turns) != 2 or IMAGE_PLACEHOLDER not in turns[0][1]):
        raise MalformedConversation("the plain template takes one human turn with <image> and one answer, "
                                    f"found {len(turns)} turns")
    pieces = _pieces(t, turns, generation=False)
    text, spans = "", []
    for piece, is_target in pieces:
        if is_target:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    ids, targets, image_positions = _tokenize_with_spans(text, spans, tokenizer, image_token_id,
                                                         num_image_tokens)
    if max_length is not None and len(ids) > max_length:
        for pos in image_positions:
            if pos < max_length < pos + num_image_tokens:
                raise TooLong(f"{len(ids)} tokens; truncating to max_length={max_length} would cut "
                              f"through the image tokens at [{pos}, {pos + num_image_tokens})")
        ids, targets = ids[:max_length], targets[:max_length]
    input_ids = np.asarray(ids, np.int32)
    labels = np.where(np.asarray(targets, bool), input_ids, IGNORE_INDEX).astype(np.int32)
    if not (labels != IGNORE_INDEX).any():
        raise EmptyTargets(f"no target tokens left ({len(ids)} tokens"
                           + (f", max_length={max_length})" if max_length is not None else ")"))
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(prompt: str, tokenizer, image_token_id: int, num_image_tokens: int) -> np.ndarray:
    """Token ids of a rendered prompt (e.g. from `generation_prompt`), each <image> expanded to
    `num_image_tokens` copies of `image_token_id`: the input for generation."""
    ids, _, _ = _tokenize_with_spans(prompt, [], tokenizer, image_token_id, num_image_tokens)
    return np.asarray(ids, np.int32)
