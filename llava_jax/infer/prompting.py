"""From chat turns and images to model inputs, and from generated tokens back to text.

Rendering and tokenization are llava_jax.data.conversation's (the training templates), image
preprocessing is llava_jax.data.image's (LLaVA-1.5) or llava_jax.data.anyres's (LLaVA-1.6: each image
becomes tiles padded to the model's static tile count, and its <image> expands to its own
`anyres.num_image_tokens(size)` placeholders); this module only wires them together for inference
and adds incremental detokenization for streaming.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from llava_jax.data import anyres, conversation, image as image_lib
from llava_jax.validate import BadInput

DEFAULT_TEMPLATE = "vicuna_v1"
DEFAULT_IMAGE_ASPECT = "pad"
# Written next to config.json by training / conversion: {"template": ..., "image_aspect": ...}, or a
# training config with those keys under "data". Optional: defaults are LLaVA-1.5's.
CHAT_SETTINGS_FILES = ("inference.json", "train_config.json")
# What a conversation the user can fix raises (a malformed conversation, an image that cannot be
# read or that AnyRes cannot tile, a prompt longer than the context): a CLI prints them and goes on.
INPUT_ERRORS = (BadInput, conversation.BadSample)


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    template: str = DEFAULT_TEMPLATE
    image_aspect: str = DEFAULT_IMAGE_ASPECT


def chat_settings(ckpt: str, template: Optional[str] = None, image_aspect: Optional[str] = None) -> ChatSettings:
    """Template and image aspect for a checkpoint: explicit arguments, else what the checkpoint
    records, else vicuna_v1 / pad."""
    recorded = {}
    from llava_jax.checkpoint import model_root

    root = model_root(ckpt)
    for name in CHAT_SETTINGS_FILES:
        file = os.path.join(root, name)
        if os.path.isfile(file):
            with open(file) as f:
                d = json.load(f)
            d = d.get("data", d) if isinstance(d, dict) else {}
            recorded = {k: d[k] for k in ("template", "image_aspect") if isinstance(d.get(k), str)}
            break
    # A stage-1 ('plain') checkpoint has no chat format; chatting with it still uses its template.
    settings = ChatSettings(template=template or recorded.get("template", DEFAULT_TEMPLATE),
                            image_aspect=image_aspect or recorded.get("image_aspect", DEFAULT_IMAGE_ASPECT))
    conversation.get_template(settings.template)  # fail early on an unknown name
    if settings.image_aspect not in image_lib.ASPECTS:
        raise ValueError(f"unknown image aspect {settings.image_aspect!r}; expected one of {image_lib.ASPECTS}")
    return settings


def stop_ids(config, tokenizer, template) -> list:
    """The token ids that end an answer: the model's EOS, the tokenizer's EOS and the template's
    end-of-turn token (<|im_end|> for chatml / chatml_direct, the chat_template's for 'tokenizer').
    Raises conversation.TemplateMismatch when that marker is not one special token of `tokenizer`."""
    ids = {int(i) for i in np.atleast_1d(config.text.eos_token_id)}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(conversation.stop_token_ids(template, tokenizer))
    return sorted(ids)


class Prompt(NamedTuple):
    """One conversation's model inputs (`generate(ids[None], pixel_values, image_sizes=image_sizes)`)."""

    input_ids: np.ndarray  # (S,) int32, each image's placeholders expanded
    pixel_values: Optional[np.ndarray]  # (N, H, W, 3); AnyRes (N, P, H, W, 3) tiles; None without images
    image_sizes: Optional[np.ndarray]  # AnyRes: (N, 2) int32 original (height, width); else None


class PromptBuilder:
    """Turns [(role, text, has_image)] + images into a `Prompt` for one row."""

    def __init__(self, tokenizer, config, settings: ChatSettings = ChatSettings()):
        self.tokenizer, self.config, self.settings = tokenizer, config, settings

    def image(self, image) -> tuple:
        """A path, bytes, PIL image or uint8 array -> (pixels, (height, width) of the original).

        pixels: normalized float32 (size, size, 3) preprocessed with the settings' image aspect; for an
        AnyRes model the base image and grid tiles padded with zero tiles to `anyres.max_tiles`
        (P, size, size, 3) (the image aspect does not apply). An image AnyRes cannot represent (too
        thin, or absurdly large) raises `anyres.UnusableImage` (a ValueError) naming its size."""
        cfg = self.config
        if not cfg.anyres:
            pixels = image_lib.preprocess(image, cfg.vision.image_size, self.settings.image_aspect)
            return pixels, None
        size = cfg.vision.image_size
        pixels, size_hw = anyres.preprocess_anyres(image, cfg.image_grid_pinpoints, size,
                                                   anyres.max_tiles(cfg.image_grid_pinpoints, size))
        self.image_tokens(size_hw)  # a too-thin image fails here, with its size, before any prompt is built
        return pixels, size_hw

    def image_tokens(self, size_hw=None) -> int:
        """Placeholders of an image of original size (height, width): LLaVA-1.5's fixed count, or the
        AnyRes count of that size."""
        cfg = self.config
        if not cfg.anyres:
            return cfg.num_image_tokens
        v = cfg.vision
        return anyres.num_image_tokens(size_hw, cfg.image_grid_pinpoints, v.image_size, v.patch_size)

    def input_ids(self, turns: Sequence[tuple], image_sizes: Optional[Sequence] = None) -> np.ndarray:
        """turns: (role 'user'|'assistant', text, has_image), alternating, starting and ending with
        'user'. A user turn with an image gets the <image> placeholder (placed first, as in training).
        An AnyRes model needs `image_sizes`, the (height, width) of the turns' images in order."""
        records, with_image = [], 0
        for role, text, has_image in turns:
            if conversation.IMAGE_PLACEHOLDER in text:
                text = text.replace(conversation.IMAGE_PLACEHOLDER, "")  # only real images get a slot
            if has_image:
                text = conversation.IMAGE_PLACEHOLDER + "\n" + text
                with_image += 1
            records.append({"from": "human" if role == "user" else "gpt", "value": text})
        counts = self.config.num_image_tokens
        if self.config.anyres and with_image:
            sizes = [] if image_sizes is None else list(image_sizes)
            if len(sizes) < with_image:
                raise ValueError(f"{with_image} turn(s) have an image but {len(sizes)} image size(s) were given: "
                                 f"an AnyRes model's placeholder count depends on each image's size")
            counts = [self.image_tokens(size) for size in sizes[:with_image]]
        prompt = conversation.generation_prompt(records, self.settings.template, tokenizer=self.tokenizer)
        return conversation.encode_prompt(prompt, self.tokenizer, self.config.image_token_id, counts,
                                          template=self.settings.template)

    def encode(self, turns: Sequence[tuple], images: Sequence = ()) -> Prompt:
        """The model inputs of one conversation; `images` are those of the turns with an image, in order."""
        prepared = [self.image(im) for im in images]
        sizes = np.asarray([s for _, s in prepared], np.int32) if prepared and self.config.anyres else None
        ids = self.input_ids(turns, sizes)
        pixels = np.stack([p for p, _ in prepared]) if prepared else None
        return Prompt(ids, pixels, sizes)


def check_context(config, input_ids) -> None:
    """`validate.BadInput` (a ValueError) unless a prompt fits the model's context
    (max_position_embeddings), saying how many of its tokens are image tokens (an AnyRes image alone
    may take ~2,900): never a silent cut."""
    from llava_jax.infer.generate import image_tokens_note

    context = int(config.text.max_position_embeddings)
    if len(input_ids) > context:
        raise BadInput(f"the prompt takes {len(input_ids)} tokens{image_tokens_note(config, input_ids)} but the "
                       f"model's context is {context} (max_position_embeddings); use fewer or smaller images "
                       f"or a shorter conversation")


def left_pad(rows: Sequence[np.ndarray], pad_id: int):
    """Token rows of different lengths -> (input_ids, attention_mask), padded on the left."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


class TextStream:
    """Incremental detokenization for streaming: feed token ids, get the new text since last time.

    Decoding token by token is wrong for multi-byte characters and for tokenizers that add spaces
    depending on context, so it decodes the whole answer each time and emits the new suffix, holding
    back an incomplete character ('\\ufffd' at the end), everything while the answer ends in
    sentencepiece byte-fallback pieces ('<0x88>': a run of them is decoded together, so a later byte
    can turn an earlier one into '\\ufffd'), and any tail that could still become one of the stop
    strings. The final text is cut before the first stop string (OpenAI's `stop`).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self._byte_piece = {}
        self.stop = [s for s in stop if s]
        self.tokens: list = []
        self.emitted = 0
        self.stopped = False

    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _held_back(self, text: str) -> int:
        held = 0
        if text.endswith("\ufffd"):
            held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def push(self, token: int) -> str:
        """Add a token; returns the text that became final (possibly '')."""
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        if self._is_byte_piece(int(token)):
            return ""
        text = self.text()
        end = len(text) if self.stopped else len(text) - self._held_back(text)
        if end <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:end], end
        return delta

    def _is_byte_piece(self, token: int) -> bool:
        if token not in self._byte_piece:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            self._byte_piece[token] = (isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x")
                                       and piece.endswith(">"))
        return self._byte_piece[token]

    def finish(self) -> str:
        """The rest of the text once no more tokens come."""
        text = self.text()
        delta, self.emitted = text[self.emitted:], len(text)
        return delta


class ChatModel:
    """A checkpoint ready to chat: model (as a Generator), tokenizer, template and image settings.

    `reply(turns, images, ...)` answers the conversation so far; chat.py and server.py use it.
    `eos_ids` (see `stop_ids`) are the ids generation stops at; they are never part of a reply.
    """

    def __init__(self, generator, tokenizer, settings: ChatSettings = ChatSettings()):
        self.generator = generator
        self.config = generator.config
        self.tokenizer = tokenizer
        self.settings = settings
        self.prompts = PromptBuilder(tokenizer, self.config, settings)
        self.eos_ids = stop_ids(self.config, tokenizer, settings.template)
        self.pad_id = int(self.config.pad_token_id)

    @classmethod
    def load(cls, ckpt: str, template: Optional[str] = None, image_aspect: Optional[str] = None,
             mesh=None, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
             chunk_size: Optional[int] = None, weights_dtype: str = "float32",
             adapter: Optional[str] = None) -> "ChatModel":
        """dtype: compute dtype override ('bfloat16' on TPU); param_dtype: 'bfloat16' halves the
        parameter memory for inference; mesh: shard the parameters over it; weights_dtype:
        'bfloat16' or 'int8' converts the language model's matmul kernels for generation
        (`llava_jax.models.layout`; faster decoding on CPU, slightly different logits); adapter: a
        LoRA training workdir or peft adapter folder merged into `ckpt` (the base) as it loads."""
        from llava_jax.checkpoint import load_pretrained, load_tokenizer
        from llava_jax.infer.generate import DEFAULT_CHUNK_SIZE, Generator

        # A LoRA run records the template it was trained with; a peft folder has none (the base's applies).
        run = _lora_run(adapter)
        settings = chat_settings(run or ckpt, template, image_aspect)
        tokenizer = load_tokenizer(ckpt)
        conversation.check_tokenizer(settings.template, tokenizer)  # before the weights: fail fast
        model, _ = load_pretrained(ckpt, dtype=dtype, mesh=mesh, param_dtype=param_dtype, adapter=adapter)
        generator = Generator(model, mesh=mesh, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                              weights_dtype=weights_dtype)
        return cls(generator, tokenizer, settings)

    def encode(self, turns: Sequence[tuple], images: Sequence = ()) -> Prompt:
        """-> Prompt(input_ids (S,), pixel_values or None, image_sizes or None) for one conversation."""
        return self.prompts.encode(turns, images)

    def reply(self, turns: Sequence[tuple], images: Sequence = (), *, max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, on_text=None) -> str:
        """The assistant's answer to `turns` (ending with a user turn); `on_text(delta)` streams it.
        A prompt longer than the model's context raises `validate.BadInput` (`check_context`), an image
        AnyRes cannot use `anyres.UnusableImage` (both ValueErrors; see `INPUT_ERRORS`)."""
        ids, pixels, sizes = self.encode(turns, images)
        check_context(self.config, ids)
        stream = TextStream(self.tokenizer)

        def callback(tokens, active):
            # Every answer token passes through here (EOS excluded), so `stream.tokens` is the answer.
            if active[0] and int(tokens[0]) not in self.eos_ids:
                delta = stream.push(int(tokens[0]))
                if delta and on_text is not None:
                    on_text(delta)

        self.generator.generate(ids[None], pixels, None, image_sizes=sizes, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed, eos_token_id=self.eos_ids,
                                pad_token_id=self.pad_id, stream_callback=callback)
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(rest)
        return stream.text()


def _lora_run(adapter: Optional[str]) -> Optional[str]:
    """The workdir of a LoRA training run given as --adapter (None for a peft folder or no adapter)."""
    if not adapter:
        return None
    from llava_jax.peft_io import read_run_file

    run = read_run_file(adapter)
    return run["root"] if run else None


def mesh_from_arg(arg: Optional[str]):
    """'--mesh data,fsdp,tensor' (one size may be -1) -> a Mesh; None/'' -> None (one device)."""
    if not arg:
        return None
    from llava_jax.sharding import make_mesh, parse_mesh

    return make_mesh(*parse_mesh(arg))


def add_model_arguments(parser) -> None:
    """The checkpoint-loading options `llava-jax chat` and `llava-jax serve` share."""
    parser.add_argument("--template", help="conversation template (default: the checkpoint's, else vicuna_v1)")
    parser.add_argument("--image-aspect", choices=("pad", "square"),
                        help="image preprocessing (default: the checkpoint's, else pad); LLaVA-1.6 (AnyRes) "
                             "checkpoints tile every image instead")
    parser.add_argument("--dtype", help="compute dtype override, e.g. bfloat16")
    parser.add_argument("--param-dtype", help="parameter dtype, e.g. bfloat16 (half the memory of float32)")
    parser.add_argument("--mesh", help="shard the model: data,fsdp,tensor sizes, e.g. 1,1,-1 (tensor-parallel)")
    parser.add_argument("--weights-dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                        help="language-model matmul kernels for generation: float32 keeps them as loaded; "
                             "bfloat16 or int8 (int8 kernels and per-row int8 inputs) decode faster on CPU "
                             "with slightly different logits (BENCHMARKS.md)")
    parser.add_argument("--adapter", help="LoRA adapter merged into --ckpt (the base) when loading: a LoRA "
                        "training workdir or a peft adapter folder (the reference's too)")


def load_from_args(args) -> ChatModel:
    """A ChatModel from `--ckpt` and the options of `add_model_arguments`."""
    return ChatModel.load(args.ckpt, template=args.template, image_aspect=args.image_aspect, dtype=args.dtype,
                          param_dtype=args.param_dtype, mesh=mesh_from_arg(args.mesh),
                          weights_dtype=args.weights_dtype, adapter=getattr(args, "adapter", None))
