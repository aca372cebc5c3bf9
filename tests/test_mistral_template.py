"""`mistral_instruct` (LLaVA-1.6-Mistral-7B) against a restatement of the reference's SeparatorStyle.LLAMA_2
rendering and its preprocess_llama_2 label masking."""
from __future__ import annotations

import numpy as np
import pytest

from llava_jax.data import conversation as conv
from test_conversation import (REF_IMAGE_TOKEN_INDEX, conversations,
                               ref_preprocess_multimodal, ref_tokenizer_image_token)
from llava_jax.testing.tokenizer import llama_tokenizer


# ----- the reference, restated (LLaVA conversation.py get_prompt LLAMA_2 / train.py preprocess_llama_2) ----

def ref_prompt_llama_2(source, system=""):
    wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg
    wrap_inst = lambda msg: f"[INST] {msg} [/INST]"
    sep, sep2 = "", "</s>"
    ret = ""
    for i, turn in enumerate(source):
        message = turn["value"]
        if i == 0:
            message = wrap_sys(system) + message
        if i % 2 == 0:
            ret += sep + wrap_inst(message)
        else:
            ret += " " + message + " " + sep2
    return ret.lstrip(sep)


def ref_preprocess_llama_2(source, tok, has_image):
    if has_image:
        source = ref_preprocess_multimodal(source)
    prompt = ref_prompt_llama_2(source)
    ids = ref_tokenizer_image_token(prompt, tok) if has_image else tok(prompt).input_ids
    target = list(ids)
    total_len = sum(1 for i in ids if i != tok.pad_token_id)
    sep = "[/INST] "
    rounds = prompt.split("</s>")
    cur_len = 1
    target[:cur_len] = [-100]
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(ref_tokenizer_image_token(rou, tok))
            instruction_len = len(ref_tokenizer_image_token(parts[0], tok)) - 2
        else:
            round_len = len(tok(rou).input_ids)
            instruction_len = len(tok(parts[0]).input_ids) - 2
        target[cur_len:cur_len + instruction_len] = [-100] * len(target[cur_len:cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [-100] * len(target[cur_len:])
    mismatch = cur_len != total_len
    if mismatch:
        target = [-100] * len(target)
    return np.array(ids), np.array(target), mismatch


SOURCE = [{"from": "human", "value": "What is shown? <image>"}, {"from": "gpt", "value": "A cat."},
          {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]


def test_strings():
    assert conv.render(SOURCE, "mistral_instruct") == (
        "[INST] <image>\nWhat is shown? [/INST] A cat. </s>[INST] Colour? [/INST] Red. </s>")
    assert conv.render(SOURCE, "mistral_instruct") == ref_prompt_llama_2(ref_preprocess_multimodal(SOURCE))
    assert conv.generation_prompt(SOURCE[:3], "mistral_instruct") == (
        "[INST] <image>\nWhat is shown? [/INST] A cat. </s>[INST] Colour? [/INST]")
    system = [{"from": "system", "value": "Be brief."}]
    assert conv.render(system + SOURCE[:2], "mistral_instruct") == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is shown? [/INST] A cat. </s>")
    assert conv.render(system + SOURCE, "mistral_instruct") == ref_prompt_llama_2(ref_preprocess_multimodal(SOURCE),
                                                                                   "Be brief.")
    assert conv.end_token("mistral_instruct") is None  # "</s>" is the EOS token: generation stops on EOS


@pytest.mark.parametrize("legacy", [True, False])
def test_labels_match_reference(legacy):
    """Identical ids always; identical labels wherever the reference's token counting holds (it masks
    the whole sample where it does not); our targets are always exactly the answers."""
    tok = llama_tokenizer(legacy=legacy)
    exact = 0
    for source, has_image in conversations(160, seed=11 + legacy):
        ref_ids, ref_labels, mismatch = ref_preprocess_llama_2(source, tok, has_image)
        out = conv.encode(source, tok, "mistral_instruct", REF_IMAGE_TOKEN_INDEX, num_image_tokens=1)
        np.testing.assert_array_equal(out["input_ids"], ref_ids)
        if not mismatch:
            exact += 1
            np.testing.assert_array_equal(out["labels"], ref_labels)
        assert_answers(out, ref_preprocess_multimodal(source) if has_image else source, tok)
    print(f"legacy={legacy}: {exact} of 160 identical to the reference")
    # preprocess_llama_2 has no legacy=False correction (preprocess_v1 has one), so with legacy=False it
    # miscounts, and masks, most multi-round samples; single-round ones still agree.
    assert exact >= (100 if legacy else 40)


def assert_answers(out, source, tok):
    """Each target run decodes to the answer followed by the closing "</s>"."""
    answers = [t["value"] for t in source if t["from"] == "gpt"]
    runs = [[int(x) for x in run] for run in _runs(out["labels"])]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == tok.eos_token_id
        assert tok.decode(run[:-1]).strip() == answer.strip()


def _runs(labels):
    runs, cur = [], []
    for x in labels:
        if x != conv.IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


