"""Templates and label masking against a faithful re-statement of the reference's algorithm."""
from __future__ import annotations

import random

import numpy as np
import pytest

from llava_jax.data import conversation as conv
from llava_jax.testing.tokenizer import IMAGE_TOKEN_ID, llama_tokenizer

REF_IMAGE_TOKEN_INDEX = -200
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


# ----- the reference, restated (LLaVA train.py / mm_utils.py / conversation.py) ----------------

def ref_tokenizer_image_token(prompt, tok):
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    out, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        out.append(chunks[0][0])
    sep = [REF_IMAGE_TOKEN_INDEX] * (offset + 1)
    interleaved = [x for pair in zip(chunks, [sep] * len(chunks)) for x in pair][:-1]
    for x in interleaved:
        out.extend(x[offset:])
    return out


def ref_preprocess_multimodal(source):
    source = [dict(s) for s in source]
    for s in source:
        if "<image>" in s["value"]:
            s["value"] = "<image>\n" + s["value"].replace("<image>", "").strip()
    return source


def ref_prompt_two(source, system):
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, s in enumerate(source):
        ret += roles[s["from"]] + ": " + s["value"] + seps[i % 2]
    return ret


def ref_preprocess_v1(source, tok, has_image):
    """Returns (input_ids, labels, mismatch) like preprocess_v1 with IS_TOKENIZER_GREATER_THAN_0_14."""
    if has_image:
        source = ref_preprocess_multimodal(source)
    prompt = ref_prompt_two(source, VICUNA_SYSTEM)
    ids = ref_tokenizer_image_token(prompt, tok) if has_image else tok(prompt).input_ids
    target = list(ids)
    total_len = sum(1 for i in ids if i != tok.pad_token_id)
    sep = " " + "ASSISTANT" + ": "
    rounds = prompt.split("</s>")
    cur_len = 1
    target[:cur_len] = [-100] * cur_len
    for i, rou in enumerate(rounds):
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
        if i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur_len:cur_len + instruction_len] = [-100] * len(target[cur_len:cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [-100] * len(target[cur_len:])
    mismatch = cur_len != total_len
    if mismatch:
        target = [-100] * len(target)
    return np.array(ids), np.array(target), mismatch


def ref_preprocess_plain(source, tok):
    source = ref_preprocess_multimodal(source)
    prompt = "<image>" + source[1]["value"] + "\n"
    ids = ref_tokenizer_image_token(prompt, tok)
    target = list(ids)
    n = len(ref_tokenizer_image_token("<image>", tok))
    target[:n] = [-100] * n
    return np.array(ids), np.array(target)


# ----- generated conversations ------------------------------------------------------------------

WORDS = ("what is the colour of circle square left right how many objects are there describe image "
         "red green blue large small near far picture scene").split()
ODD = ["café", "日本語", "🙂", "ñandú", "Ελληνικά", "°C", "x²", "—", "€5", "\t", "  ", "a\u00a0b"]


def random_text(rng, lo, hi):
    words = []
    for _ in range(rng.randint(lo, hi)):
        r = rng.random()
        if r < 0.12:
            words.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        elif r < 0.22:
            words.append(rng.choice(ODD))
        elif r < 0.28:
            words.append(rng.choice(["\n", "\n\n", ".\n", ":", "?", "!", "(A)", "1."]))
        else:
            words.append(rng.choice(WORDS))
    text = " ".join(words)
    return text if text.strip() else "ok"


def random_conversation(rng, with_image):
    rounds = rng.randint(1, 6) if rng.random() < 0.5 else rng.randint(1, 2)
    turns = []
    for r in range(rounds):
        q = random_text(rng, 1, 12)
        if with_image and r == 0:
            q = rng.choice(["<image>\n" + q, q + "\n<image>", q + " <image>", "<image>" + q])
        long_answer = rng.random() < 0.15
        a = random_text(rng, 40, 120) if long_answer else random_text(rng, 1, 15)
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


def conversations(n, seed):
    rng = random.Random(seed)
    return [(random_conversation(rng, with_image=(i % 4 != 3)), i % 4 != 3) for i in range(n)]


def target_runs(labels):
    runs, cur = [], []
    for x in labels:
        if x != conv.IGNORE_INDEX:
            cur.append(int(x))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def assert_targets_are_answers(out, source, tok, end):
    answers = [t["value"] for t in source if t["from"] == "gpt"]
    runs = target_runs(out["labels"])
    decoded = [tok.decode(r) for r in runs]
    assert decoded == [a + end for a in answers]
    # Everything that is not a target is IGNORE, and targets equal the inputs.
    keep = out["labels"] != conv.IGNORE_INDEX
    np.testing.assert_array_equal(out["labels"][keep], out["input_ids"][keep])


# ----- tests ------------------------------------------------------------------------------------

def test_template_strings():
    convs = [{"from": "human", "value": "What is shown? <image>"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]
    assert conv.render(convs, "vicuna_v1") == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Red.</s>")
    assert conv.render(convs, "v1") == conv.render(convs, "vicuna_v1")
    human_system = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                    "gives helpful, detailed, and polite answers to the human's questions.")
    assert conv.render(convs, "llava_v1") == (
        human_system + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Red.</s>")
    assert conv.render(convs, "llava_v0") == (
        human_system + "###Human: <image>\nWhat is shown?###Assistant: A cat.###Human: Colour?###Assistant: Red.###")
    assert conv.render(convs[:2], "plain") == "<image>A cat.\n"
    assert conv.generation_prompt(convs[:1], "vicuna_v1") == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:")
    assert conv.generation_prompt(convs[:3], "v0").endswith("###Human: Colour?###Assistant:")
    assert conv.generation_prompt(convs[:1], "plain") == "<image>"
    with pytest.raises(ValueError, match="unknown conversation template"):
        conv.get_template("no_such_template")


@pytest.mark.parametrize("spaced_roles", [False, True], ids=["llama_vocab", "spaced_roles_vocab"])
@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_v1_matches_reference(legacy, spaced_roles):
    """Identical ids always; identical labels wherever the reference reports no mismatch; where it
    does (it then masks the whole sample), our targets are still exactly the answers."""
    tok = llama_tokenizer(legacy=legacy, spaced_roles=spaced_roles)
    exact, mismatched = 0, []
    for i, (source, has_image) in enumerate(conversations(240, seed=1 + legacy)):
        ref_ids, ref_labels, mismatch = ref_preprocess_v1(source, tok, has_image)
        out = conv.encode(source, tok, "vicuna_v1", REF_IMAGE_TOKEN_INDEX, num_image_tokens=1)
        assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32
        np.testing.assert_array_equal(out["input_ids"], ref_ids)  # same tokens, always
        if mismatch:
            mismatched.append(i)
        else:
            exact += 1
            np.testing.assert_array_equal(out["labels"], ref_labels)
        assert_targets_are_answers(out, ref_preprocess_multimodal(source) if has_image else source, tok, "</s>")
    print(f"legacy={legacy} spaced_roles={spaced_roles}: {exact} identical to the reference, "
          f"reference mismatch on {len(mismatched)}: {mismatched}")
    assert exact >= 60
    if spaced_roles and not legacy:  # the reference's "round_len -= 1" is wrong for this vocabulary
        assert len(mismatched) >= 100


def test_reference_mismatch_cases_are_still_correct():
    # A question quoting the role separator defeats the reference's string splitting (it masks the
    # whole sample); span bookkeeping is unaffected.
    source = [{"from": "human", "value": "<image>\nSay ' ASSISTANT: ' please"}, {"from": "gpt", "value": "ok 42"},
              {"from": "human", "value": "And </s> too?"}, {"from": "gpt", "value": "sure"}]
    for legacy in (True, False):
        tok = llama_tokenizer(legacy=legacy)
        _, _, mismatch = ref_preprocess_v1(source, tok, has_image=True)
        assert mismatch
        out = conv.encode(source, tok, "vicuna_v1", REF_IMAGE_TOKEN_INDEX, num_image_tokens=1)
        assert_targets_are_answers(out, source, tok, "</s>")


@pytest.mark.parametrize("legacy", [True, False])
def test_plain_matches_reference(legacy):
    tok = llama_tokenizer(legacy=legacy)
    rng = random.Random(7)
    for _ in range(60):
        caption = random_text(rng, 1, 30)
        source = [{"from": "human", "value": random_text(rng, 1, 5) + "\n<image>"},
                  {"from": "gpt", "value": caption}]
        ref_ids, ref_labels = ref_preprocess_plain(source, tok)
        out = conv.encode(source, tok, "plain", REF_IMAGE_TOKEN_INDEX, num_image_tokens=1)
        np.testing.assert_array_equal(out["input_ids"], ref_ids)
        np.testing.assert_array_equal(out["labels"], ref_labels)
        assert out["labels"][:2].tolist() == [-100, -100]  # BOS and the image are masked
        assert tok.decode(target_runs(out["labels"])[0]) == caption + "\n"


@pytest.mark.parametrize("legacy", [True, False])
def test_v0_targets_are_answers_and_separators(legacy):
    tok = llama_tokenizer(legacy=legacy)
    for source, has_image in conversations(60, seed=11):
        out = conv.encode(source, tok, "v0", REF_IMAGE_TOKEN_INDEX, num_image_tokens=1)
        prompt = conv.render(source, "v0")
        np.testing.assert_array_equal(out["input_ids"], ref_tokenizer_image_token(prompt, tok))
        assert_targets_are_answers(out, ref_preprocess_multimodal(source), tok, "###")


def test_image_expansion_lines_up_with_single_placeholder():
    tok = llama_tokenizer()
    for source, has_image in conversations(20, seed=3):
        one = conv.encode(source, tok, "vicuna_v1", REF_IMAGE_TOKEN_INDEX, num_image_tokens=1)
        many = conv.encode(source, tok, "vicuna_v1", IMAGE_TOKEN_ID, num_image_tokens=5)
        expected_ids, expected_labels = [], []
        for i, l in zip(one["input_ids"], one["labels"]):
            n = 5 if i == REF_IMAGE_TOKEN_INDEX else 1
            expected_ids += [IMAGE_TOKEN_ID if n == 5 else i] * n
            expected_labels += [l] * n
        assert many["input_ids"].tolist() == expected_ids
        assert many["labels"].tolist() == expected_labels
        assert (many["input_ids"] == IMAGE_TOKEN_ID).sum() == (5 if has_image else 0)


def test_encode_prompt_matches_training_prefix():
    tok = llama_tokenizer()
    source = [{"from": "human", "value": "What is shown? <image>"}, {"from": "gpt", "value": "A red circle."}]
    prompt = conv.generation_prompt(source[:1], "vicuna_v1")
    ids = conv.encode_prompt(prompt, tok, IMAGE_TOKEN_ID, 4)
    full = conv.encode(source, tok, "vicuna_v1", IMAGE_TOKEN_ID, 4)
    n = len(ids)
    assert full["input_ids"][:n].tolist() == ids.tolist()
    assert (full["labels"][:n] == conv.IGNORE_INDEX).all() and (full["labels"][n:] != conv.IGNORE_INDEX).all()


def test_truncation_and_bad_conversations():
    tok = llama_tokenizer()
    source = [{"from": "human", "value": "<image>\n" + "describe the scene " * 5},
              {"from": "gpt", "value": "A red circle " * 10}]
    full = conv.encode(source, tok, "vicuna_v1", IMAGE_TOKEN_ID, 8)
    first_target = int(np.argmax(full["labels"] != conv.IGNORE_INDEX))
    cut = conv.encode(source, tok, "vicuna_v1", IMAGE_TOKEN_ID, 8, max_length=first_target + 3)
    assert len(cut["input_ids"]) == first_target + 3 and (cut["labels"] != -100).sum() == 3
    with pytest.raises(conv.EmptyTargets):
        conv.encode(source, tok, "vicuna_v1", IMAGE_TOKEN_ID, 8, max_length=first_target)
    image_at = int(np.argmax(full["input_ids"] == IMAGE_TOKEN_ID))
    with pytest.raises(conv.TooLong, match="cut through the image"):
        conv.encode(source, tok, "vicuna_v1", IMAGE_TOKEN_ID, 8, max_length=image_at + 3)
    with pytest.raises(conv.RolesOutOfOrder, match="turn 1"):
        conv.encode([source[0], source[0]], tok)
    with pytest.raises(conv.RolesOutOfOrder, match="turn 0"):
        conv.encode(source[::-1], tok)
    with pytest.raises(conv.EmptyAnswer):
        conv.encode([source[0], {"from": "gpt", "value": "  "}], tok)
    with pytest.raises(conv.MalformedConversation, match="unknown speaker"):
        conv.encode([{"from": "bob", "value": "x"}], tok)
    with pytest.raises(conv.MalformedConversation):
        conv.encode([{"value": "x"}], tok)
    assert issubclass(conv.EmptyTargets, conv.BadSample) and conv.EmptyTargets.reason == "empty_targets"
