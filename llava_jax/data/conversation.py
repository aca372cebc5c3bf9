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

Templates with an end-of-turn token (`chatml`, `chatml_direct`, `tokenizer`) close every answer with
one special token of the tokenizer (`<|im_end|>` for ChatML): the answer plus that token are the
targets, and the same token stops generation (`stop_token_ids`). A tokenizer on which the marker is
not exactly one special token is refused (`TemplateMismatch`) instead of training a model that never
emits it. For these templates a token never straddles the start of an answer: where the whole-text
tokenization would merge the prompt's last characters with the answer's first ones, the text is
tokenized in two parts at the answer's start, as generation sees it (prompt first, then answer).
In `chatml` the "\\n" after each <|im_end|> is not a target: generation stops at <|im_end|> and the
next prompt supplies the newline (`chatml_direct`, the reference's MPT style, has no newline there;
its targets are the reference's preprocess_mpt ones: answer + <|im_end|>).

The `tokenizer` template (alias `hf`) renders with `tokenizer.apply_chat_template`. The target of
answer k is the text between the generation prompt for it (the conversation before it, rendered with
add_generation_prompt=True) and the end of the special token that follows the answer (whitespace
between the two included): exactly what the model must generate after that prompt. Limits, each a
one-line TemplateMismatch: the generation prompt must be a prefix of the whole rendering (templates
that render earlier turns differently once later ones exist, e.g. ones dropping past reasoning, are
refused); the answer must appear verbatim (or stripped) right after it; it must be followed by a
special token. Message content is passed as a plain string (`<image>` inside it), the default system
prompt is the chat_template's own, and no BOS is added (the chat_template writes it if it wants one).

A conversation may start with a system turn ({"from": "system", "value": ...}): it replaces the
template's default system prompt; `plain` has none and raises `SystemTurnUnsupported`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from llava_jax.validate import UserError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

HUMAN, ASSISTANT, SYSTEM = 0, 1, 2
_ROLE_OF_SPEAKER = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}


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


class SystemTurnUnsupported(BadSample):
    """The record starts with a system turn but the template has no system prompt (plain)."""

    reason = "system_turn_unsupported"


class TemplateMismatch(UserError, ValueError):
    """The template cannot be used with this tokenizer (its end-of-turn marker is not one special
    token, or it has no chat_template). A set-up error the user fixes (the CLI prints it as one
    line), not a bad record: never a BadSample."""


# ----- templates ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation format. style 'two': turns end with sep / sep2 alternately (vicuna_v1);
    'single': every turn ends with sep (v0); 'plain': "<image>" + caption + sep (stage 1);
    'chatml': "<|im_start|>{role}\\n{text}<|im_end|>\\n" per turn; 'mpt': the reference's MPT style
    (chatml_direct: no newline after <|im_end|>); 'llama_2': "[INST] {q} [/INST]" questions and
    " {a} </s>" answers (mistral_instruct); 'hf': the tokenizer's own chat_template.
    `end`: the end-of-turn token that closes answers and stops generation ('' for the reference's
    text separators; for 'hf' it is found from the tokenizer's rendering)."""

    name: str
    system: str
    roles: tuple
    style: str
    sep: str
    sep2: str = ""
    end: str = ""

    def turn_end(self, index: int) -> str:
        if self.style == "two":
            return self.sep if index % 2 == 0 else self.sep2
        return self.sep

    @property
    def has_end_token(self) -> bool:
        return bool(self.end) or self.style == "hf"


_SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                "gives helpful, detailed, and polite answers to the user's questions.")
_SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the human's questions.")

TEMPLATES = {
    "plain": Template("plain", "", ("", ""), "plain", "\n"),
    "v0": Template("v0", _SYSTEM_HUMAN, ("Human", "Assistant"), "single", "###"),
    "vicuna_v1": Template("vicuna_v1", _SYSTEM_USER, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_v1": Template("llava_v1", _SYSTEM_HUMAN, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    # Generic ChatML (SmolLM2, Qwen): no system turn unless the record (or the caller) gives one.
    "chatml": Template("chatml", "", ("user", "assistant"), "chatml", "\n", end="<|im_end|>"),
    # LLaVA-NeXT-34B's conv_chatml_direct (SeparatorStyle.MPT, sep "<|im_end|>").
    "chatml_direct": Template("chatml_direct", "Answer the questions.", ("user", "assistant"), "mpt", "",
                              end="<|im_end|>"),
    # LLaVA-NeXT-Mistral-7B's conv_mistral_instruct (SeparatorStyle.LLAMA_2, sep "", sep2 "</s>", no system).
    "mistral_instruct": Template("mistral_instruct", "", ("USER", "ASSISTANT"), "llama_2", "", "</s>"),
    # Whatever the tokenizer's own jinja chat_template renders (tokenizer.apply_chat_template).
    "tokenizer": Template("tokenizer", "", ("user", "assistant"), "hf", ""),
}
ALIASES = {"llava_v0": "v0", "v1": "vicuna_v1", "hf": "tokenizer"}


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


def parse_conversation(conversations: Sequence[dict]) -> tuple:
    """LLaVA JSON `conversations` -> (system, [(role, text)]), validated: an optional first system
    turn (its text, else None), then alternating human/gpt starting with human, non-empty answers,
    image turns normalized."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise MalformedConversation(f"'conversations' must be a non-empty list, found {conversations!r:.80}")
    system, first = None, 0
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
        if role == SYSTEM:
            if i != 0:
                raise RolesOutOfOrder(f"turn {i} is from {speaker!r}; only the first turn may be a system turn")
            system, first = text, 1
            continue
        if role != (i - first) % 2:
            expected = "human" if (i - first) % 2 == 0 else "gpt"
            raise RolesOutOfOrder(f"turn {i} is from {speaker!r}, expected {expected!r} "
                                  f"(turns alternate, starting with human)")
        if role == ASSISTANT and not text.strip():
            raise EmptyAnswer(f"turn {i} (gpt) is empty")
        turns.append((role, normalize_image_turn(text)))
    if not turns:
        raise MalformedConversation("the conversation has a system turn and nothing else")
    return system, turns


def parse_turns(conversations: Sequence[dict]) -> list:
    """The [(role, text)] of `parse_conversation` (without the system turn)."""
    return parse_conversation(conversations)[1]


# ----- rendering ------------------------------------------------------------------------------

IM_START = "<|im_start|>"


def _system_text(t: Template, system: Optional[str]) -> str:
    """The system prompt: the record's system turn if it has one, else the template's default."""
    if system is None:
        return t.system
    if t.style == "plain":
        raise SystemTurnUnsupported(f"the {t.name!r} template has no system prompt, but the conversation "
                                    f"starts with a system turn ({system!r:.40})")
    return system


def _pieces(template: Template, turns, generation: bool, system: Optional[str] = None, tokenizer=None) -> list:
    """The rendered prompt as [(text, is_target)]; joining the texts gives the prompt string."""
    t = template
    if t.style == "hf":
        return _hf_pieces(t, turns, generation, system, tokenizer)[0]
    if t.style == "plain":
        _system_text(t, system)
        pieces = []
        for role, text in turns:
            if role == HUMAN:
                # Stage-1 data keeps only the image from the instruction (reference: preprocess_plain).
                pieces.append((IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in text else text, False))
            else:
                pieces.append((text + t.sep, True))
        return pieces
    if t.style in ("chatml", "mpt"):
        # chatml: every turn is "<|im_start|>{role}\n{text}<|im_end|>\n"; mpt (chatml_direct) has no
        # newline after <|im_end|>. Targets: each answer and the <|im_end|> closing it, not the
        # newline after it (generation stops at <|im_end|>; the next prompt supplies the newline).
        nl = t.sep
        system_text = _system_text(t, system)
        pieces = [(f"{IM_START}system\n{system_text}{t.end}{nl}", False)] if system_text else []
        for role, text in turns:
            if role == HUMAN:
                pieces.append((f"{IM_START}{t.roles[HUMAN]}\n{text}{t.end}{nl}", False))
            else:
                pieces.append((f"{IM_START}{t.roles[ASSISTANT]}\n", False))
                pieces.append((text + t.end, True))
                if nl:
                    pieces.append((nl, False))
        if generation:
            pieces.append((f"{IM_START}{t.roles[ASSISTANT]}\n", False))
        return pieces
    if t.style == "llama_2":
        return _llama_2_pieces(t, turns, system)
    pieces = [(_system_text(t, system) + t.sep, False)]
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


def _llama_2_pieces(t: Template, turns, system: Optional[str]) -> list:
    """The reference's SeparatorStyle.LLAMA_2: each question "[INST] {q} [/INST]" (a non-empty system
    prompt wrapped in <<SYS>> in front of the first one), each answer " {a} </s>", joined by sep ("").
    The generation prompt ends with "[/INST]". Targets: " {a} </s>", the leading space starting the
    answer's first token (the reference's preprocess_llama_2 masks "[INST] ... [/INST]" and keeps the rest)."""
    system_text = _system_text(t, system)
    pieces = []
    for i, (role, text) in enumerate(turns):
        if i == 0 and system_text:
            text = f"<<SYS>>\n{system_text}\n<</SYS>>\n\n{text}"
        if role == HUMAN:
            pieces.append((f"{t.sep}[INST] {text} [/INST]", False))
        else:
            pieces.append((f" {text} {t.sep2}", True))
    return pieces


# ----- the tokenizer's own chat_template ('tokenizer' / 'hf') ----------------------------------

def _apply_chat_template(tokenizer, messages: list, generation: bool) -> str:
    if tokenizer is None:
        raise ValueError("the 'tokenizer' template renders with the tokenizer's chat_template: pass tokenizer=...")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateMismatch(f"the 'tokenizer' template needs a tokenizer with a chat_template, and "
                               f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r} has none; "
                               f"use chatml, chatml_direct or vicuna_v1")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _special_token_texts(tokenizer) -> list:
    """The texts of the tokenizer's special tokens, longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            texts.add(str(added.content))
    return sorted((x for x in texts if x), key=len, reverse=True)


def _hf_pieces(t: Template, turns, generation: bool, system: Optional[str], tokenizer):
    """Render with tokenizer.apply_chat_template and find each answer's characters: the target of
    answer k runs from the end of the generation prompt that precedes it (rendered without the
    answer) through the special token that closes it. -> (pieces, {end-of-turn token texts})."""
    system_text = _system_text(t, system)
    messages = [{"role": "system", "content": system_text}] if system_text else []
    first = len(messages)
    messages += [{"role": "user" if role == HUMAN else "assistant", "content": text} for role, text in turns]
    full = _apply_chat_template(tokenizer, messages, generation)
    specials = _special_token_texts(tokenizer)
    pieces, ends, pos = [], set(), 0
    answer = 0
    for k, (role, text) in enumerate(turns):
        if role != ASSISTANT:
            continue
        answer += 1
        prompt = _apply_chat_template(tokenizer, messages[:first + k], True)
        if not full.startswith(prompt) or len(prompt) < pos:
            raise TemplateMismatch(
                f"the 'tokenizer' template cannot find answer {answer}: the chat_template's generation prompt "
                f"for it is not a prefix of the whole conversation (the template renders earlier turns "
                f"differently once later ones exist); use chatml or another named template")
        start = len(prompt)
        for candidate in (text, text.strip()):
            at = full.find(candidate, start) if candidate else -1
            if at >= 0 and not full[start:at].strip():
                break
        else:
            raise TemplateMismatch(f"the 'tokenizer' template cannot find answer {answer} verbatim after its "
                                   f"generation prompt in the chat_template's rendering")
        after = at + len(candidate)
        close = after
        while close < len(full) and full[close].isspace():
            close += 1
        end = next((s for s in specials if full.startswith(s, close)), None)
        if end is None:
            raise TemplateMismatch(f"the 'tokenizer' template needs answers closed by one special token, but the "
                                   f"chat_template follows answer {answer} with {full[after:after + 24]!r}")
        ends.add(end)
        pieces += [(full[pos:start], False), (full[start:close + len(end)], True)]
        pos = close + len(end)
    pieces.append((full[pos:], False))
    return [(x, is_target) for x, is_target in pieces if x], ends


# ----- the end-of-turn token ------------------------------------------------------------------

_END_IDS: dict = {}  # (id(tokenizer), template) -> (tokenizer, end id): one check per tokenizer


def end_token(template, tokenizer=None) -> Optional[str]:
    """The text of the special token that closes answers (e.g. "<|im_end|>"), or None for the
    templates that close answers with plain text (plain, v0, vicuna_v1, llava_v1). For 'tokenizer'
    it is read off the chat_template's rendering of a one-round probe conversation."""
    t = get_template(template)
    if t.style != "hf":
        return t.end or None
    _, ends = _hf_pieces(t, [(HUMAN, "Hi"), (ASSISTANT, "Hello")], False, None, tokenizer)
    (end,) = ends
    return end


def check_tokenizer(template, tokenizer) -> Optional[int]:
    """The id of the template's end-of-turn token (None for templates without one), after checking
    it is exactly one special token of `tokenizer`; raises TemplateMismatch (one line) otherwise.
    Call it once where a template meets a tokenizer (data pipeline set-up, model loading)."""
    t = get_template(template)
    if not t.has_end_token:
        return None
    key = (id(tokenizer), t)
    cached = _END_IDS.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    end = end_token(t, tokenizer)
    ids = list(tokenizer(end, add_special_tokens=False)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    special |= {i for i, a in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(a, "special", False)}
    if len(ids) != 1 or ids[0] not in special:
        found = (f"it tokenizes to {len(ids)} tokens {ids[:8]}" if len(ids) != 1
                 else f"id {ids[0]} is not a special token")
        raise TemplateMismatch(f"template {t.name!r} closes answers with {end!r}, which must be exactly one "
                               f"special token of the tokenizer, but {found}; add it as a special token or "
                               f"pick the template that fits this tokenizer")
    if len(_END_IDS) > 64:
        _END_IDS.clear()
    _END_IDS[key] = (tokenizer, ids[0])
    return ids[0]


def stop_token_ids(template, tokenizer) -> list:
    """The token ids that end an answer in `template` besides the tokenizer's EOS: [id of
    <|im_end|>] for chatml / chatml_direct, the chat_template's end-of-turn token for 'tokenizer',
    [] for the templates that close answers with text (their "</s>" is the EOS token)."""
    end = check_tokenizer(template, tokenizer)
    return [] if end is None else [end]


def render(conversations: Sequence[dict], template="vicuna_v1", tokenizer=None) -> str:
    """The training text of a LLaVA JSON conversation ('tokenizer' needs the tokenizer)."""
    system, turns = parse_conversation(conversations)
    return "".join(text for text, _ in _pieces(get_template(template), turns, False, system, tokenizer))


def generation_prompt(conversations: Sequence[dict], template="vicuna_v1", tokenizer=None) -> str:
    """The prompt for generating the next answer: the conversation so far (ending with a human turn)
    followed by the assistant role, e.g. "...questions. USER: <image>\\nWhat is shown? ASSISTANT:"
    ("...<|im_start|>assistant\\n" for chatml)."""
    t = get_template(template)
    system, turns = parse_conversation(conversations)
    if turns[-1][0] != HUMAN:
        raise RolesOutOfOrder("a generation prompt needs a conversation that ends with a human turn")
    if t.style == "plain":
        return "".join(text for text, _ in _pieces(t, turns[-1:], False, system))
    return "".join(text for text, _ in _pieces(t, turns, True, system, tokenizer))


# ----- tokenization ---------------------------------------------------------------------------

def _bos_ids(tokenizer) -> list:
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [ids[0]] if ids and ids[0] == tokenizer.bos_token_id else []


def _tokenize_exact(chunk: str, tokenizer, boundaries) -> tuple:
    """(ids, start offset of each token) for `chunk`, such that no token crosses a position in
    `boundaries`: the chunk is tokenized whole, and cut (tokenized in parts) only at the positions a
    token would cross. Starts are the previous token's end, which byte-level tokenizers' trimmed
    offsets (trim_offsets drops a token's leading space) do not disturb."""
    wanted = {p for p in boundaries if 0 < p < len(chunk)}
    cuts: set = set()
    while True:
        ids, starts = [], []
        edges = [0, *sorted(cuts), len(chunk)]
        for a, b in zip(edges, edges[1:]):
            enc = tokenizer(chunk[a:b], add_special_tokens=False, return_offsets_mapping=True)
            prev = a
            for token, (_, e) in zip(enc["input_ids"], enc["offset_mapping"]):
                ids.append(token)
                starts.append(prev)
                prev = max(prev, a + e)
        crossed = wanted - set(starts) - cuts
        if not crossed:
            return ids, starts
        cuts |= crossed


def image_token_counts(num_image_tokens, num_images: int) -> list:
    """Placeholders per image: an int applies to every image (LLaVA-1/1.5); a sequence gives one count per
    <image> in order (AnyRes, where each image's count depends on its size: anyres.num_image_tokens)."""
    if isinstance(num_image_tokens, (int, np.integer)):
        return [int(num_image_tokens)] * num_images
    counts = [int(n) for n in num_image_tokens]
    if len(counts) != num_images:
        raise MalformedConversation(f"the conversation has {num_images} <image> marker(s) but {len(counts)} "
                                    f"per-image token counts were given")
    return counts


def _tokenize_with_spans(text: str, target_spans, tokenizer, image_token_id: int, num_image_tokens,
                         exact: bool = False, bos: bool = True):
    """Tokenize like the reference's tokenizer_image_token, expanding each <image> (to its count from
    `image_token_counts`); a token is a target when its first character lies in one of `target_spans`
    (character ranges of `text`). With `exact`, no token crosses the edge of a target span (see
    _tokenize_exact). -> (ids, targets, [(start, count)] of each image's placeholder run)."""
    is_target_char = np.zeros(len(text) + 1, bool)
    for start, end in target_spans:
        is_target_char[start:end] = True
    ids = _bos_ids(tokenizer) if bos else []
    targets = [False] * len(ids)
    image_positions = []
    chunk_start = 0
    chunks = text.split(IMAGE_PLACEHOLDER)
    counts = image_token_counts(num_image_tokens, len(chunks) - 1)
    for k, chunk in enumerate(chunks):
        if k > 0:
            image_positions.append((len(ids), counts[k - 1]))
            ids += [image_token_id] * counts[k - 1]
            targets += [False] * counts[k - 1]
        if chunk and exact:
            edges = [p - chunk_start for span in target_spans for p in span]
            chunk_ids, starts = _tokenize_exact(chunk, tokenizer, edges)
            ids += chunk_ids
            targets += [bool(is_target_char[chunk_start + s]) for s in starts]
        elif chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            targets += [bool(is_target_char[chunk_start + s]) for s, _ in enc["offset_mapping"]]
        chunk_start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, targets, image_positions


def encode(conversations: Sequence[dict], tokenizer, template="vicuna_v1", image_token_id: int = 32000,
           num_image_tokens: Union[int, Sequence[int]] = 576, max_length: Optional[int] = None) -> dict:
    """Tokenize a LLaVA JSON conversation for training -> {'input_ids', 'labels'} (int32 numpy).

    Targets are every assistant answer plus the separator closing it ("</s>" for vicuna_v1, "###" for
    v0, "\\n" for plain, the end-of-turn token "<|im_end|>" for chatml / chatml_direct and the
    chat_template's for 'tokenizer'); everything else is IGNORE_INDEX. With `max_length` the sample
    is truncated (image tokens count); `num_image_tokens` may be one count per <image> (AnyRes, see
    `image_token_counts`). Truncation through an image raises TooLong, and a sample
    without any target raises EmptyTargets. Needs a fast (tokenizers-backed) tokenizer for
    character offsets. A template whose end-of-turn marker is not one special token of `tokenizer`
    raises TemplateMismatch (not a BadSample: no record can fix it).
    """
    t = get_template(template)
    system, turns = parse_conversation(conversations)
    if t.style == "plain" and (len(turns) != 2 or IMAGE_PLACEHOLDER not in turns[0][1]):
        raise MalformedConversation("the plain template takes one human turn with <image> and one answer, "
                                    f"found {len(turns)} turns")
    check_tokenizer(t, tokenizer)
    pieces = _pieces(t, turns, False, system, tokenizer)
    text, spans = "", []
    for piece, is_target in pieces:
        if is_target:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    ids, targets, image_positions = _tokenize_with_spans(text, spans, tokenizer, image_token_id,
                                                         num_image_tokens, exact=t.has_end_token,
                                                         bos=t.style != "hf")
    if max_length is not None and len(ids) > max_length:
        for pos, count in image_positions:
            if pos < max_length < pos + count:
                raise TooLong(f"{len(ids)} tokens; truncating to max_length={max_length} would cut "
                              f"through the image tokens at [{pos}, {pos + count})")
        ids, targets = ids[:max_length], targets[:max_length]
    input_ids = np.asarray(ids, np.int32)
    labels = np.where(np.asarray(targets, bool), input_ids, IGNORE_INDEX).astype(np.int32)
    if not (labels != IGNORE_INDEX).any():
        raise EmptyTargets(f"no target tokens left ({len(ids)} tokens"
                           + (f", max_length={max_length})" if max_length is not None else ")"))
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(prompt: str, tokenizer, image_token_id: int, num_image_tokens: Union[int, Sequence[int]],
                  template=None) -> np.ndarray:
    """Token ids of a rendered prompt (e.g. from `generation_prompt`), each <image> expanded to
    `num_image_tokens` copies of `image_token_id`: the input for generation. For the 'tokenizer'
    template pass `template`: its chat_template writes any BOS itself, so none is added."""
    bos = template is None or get_template(template).style != "hf"
    ids, _, _ = _tokenize_with_spans(prompt, [], tokenizer, image_token_id, num_image_tokens, bos=bos)
    return np.asarray(ids, np.int32)
