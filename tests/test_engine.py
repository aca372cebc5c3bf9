"""The slot engine (llava_jax.infer.engine): requests entering and leaving decode slots between
steps get exactly the tokens `Generator.generate` gives each of them alone."""
import os
import textwrap

import numpy as np
import pytest

from llava_jax.infer.engine import Engine, EngineClosed, QueueFull, Request
from llava_jax.infer.generate import TRACE_COUNTS, Generator
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.processes import run_python


@pytest.fixture(scope="module")
def generator():
    from flax import nnx

    from llava_jax.models.llava import LlavaModel

    return Generator(LlavaModel(tiny_llava_config(), rngs=nnx.Rngs(3)))


def make_requests(config, specs, seed=0):
    """specs: (prompt length, with image?, max_tokens) -> Requests (image placeholders inside)."""
    rng = np.random.default_rng(seed)
    t, size = config.num_image_tokens, config.vision.image_size
    out = []
    for n, with_image, max_tokens in specs:
        ids = rng.integers(3, config.image_token_id, n).astype(np.int32)
        pixels = None
        if with_image:
            start = int(rng.integers(1, n - t))
            ids[start:start + t] = config.image_token_id
            pixels = rng.normal(size=(1, size, size, 3)).astype(np.float32)
        out.append(Request(ids, pixels, max_tokens=max_tokens))
    return out


def solo(generator, request, **kw):
    tokens = generator.generate(request.input_ids[None], request.pixels, max_new_tokens=request.max_tokens,
                                temperature=request.temperature, top_k=request.top_k, seed=request.seed, **kw)
    return tokens[0].tolist()


def run_staggered(engine, requests, arrivals):
    """Submit request i before step arrivals[i]; step until all are done -> steps taken."""
    step = 0
    while step <= max(arrivals) or not all(r.finished for r in requests):
        for r, at in zip(requests, arrivals):
            if at == step:
                engine.submit(r)
        engine.step()
        step += 1
    return step


def test_staggered_arrivals_equal_single_request_answers(generator):
    config = generator.config
    specs = [(9, True, 5), (17, False, 40), (40, True, 12), (25, False, 100), (12, False, 1)]
    requests = make_requests(config, specs)
    requests[3].temperature, requests[3].top_k, requests[3].seed = 0.8, 20, 7  # a sampled row too
    expected = [solo(generator, r, eos_token_id=[]) for r in requests]
    # 3 slots for 7 requests: some wait for a slot; a small context forces rebasing and growing.
    engine = Engine(generator, max_batch=3, eos_ids=[], max_context=128)
    assert engine.cache_lengths == (128, 256)
    run_staggered(engine, requests, arrivals=[0, 0, 2, 9, 11])
    for r, want in zip(requests, expected):
        assert r.tokens == want and r.finish_reason == "length"
    assert engine.stats["rebases"] >= 2 and engine.stats["grows"] >= 1, dict(engine.stats)
    assert engine.busy_slots == 0 and engine.queue_length == 0


def test_eos_and_stop_sequences_free_the_slot_at_once(generator):
    config = generator.config
    probe = make_requests(config, [(15, True, 20)], seed=1)[0]
    full = solo(generator, probe, eos_token_id=[])
    # a token that first appears at step >= 3 plays EOS: the answer ends before it
    first = next(k for k in range(3, len(full)) if full[k] not in full[:k])
    eos = full[first]
    engine = Engine(generator, max_batch=1, eos_ids=[eos])
    stopped, waiting = make_requests(config, [(15, True, 20), (11, False, 6)], seed=1)
    stopped.stop = [full[1:3]]  # a token sequence: the row ends after its last token
    engine.submit(stopped)
    engine.submit(waiting)
    engine.step()
    assert engine.queue_length == 1  # one slot: the second request waits
    while not stopped.finished:
        engine.step()
    assert stopped.tokens == full[:3] and stopped.finish_reason == "stop"
    engine.step()  # the freed slot is taken before the next decode step
    assert engine.queue_length == 0 and engine.busy_slots == 1
    while not waiting.finished:
        engine.step()
    alone = make_requests(config, [(15, True, 20)], seed=1)[0]
    engine.run_until_done([alone])
    assert alone.tokens == full[:first] and alone.finish_reason == "eos"


def test_cancel_timeout_queue_bound_and_capacity(generator):
    config = generator.config
    engine = Engine(generator, max_batch=2, max_queue=1, eos_ids=[])
    events = []
    a, b, c, d = make_requests(config, [(10, False, 50), (10, False, 50), (10, False, 50), (10, False, 50)])
    a.on_event = lambda kind, value: events.append((kind, value))
    engine.submit(a)
    with pytest.raises(QueueFull):
        engine.submit(b)
    engine.step()
    b.timeout_s = 0.0  # expired as soon as it is looked at
    engine.submit(b)
    engine.step()
    assert b.finish_reason == "timeout" and engine.busy_slots == 1
    a.cancel()
    engine.step()  # freed before this step's decode
    assert a.finish_reason == "cancelled" and engine.busy_slots == 0
    assert events[-1] == ("done", "cancelled") and all(kind == "token" for kind, _ in events[:-1])
    with pytest.raises(ValueError, match="room for"):
        engine.submit(Request(c.input_ids, max_tokens=engine.capacity(10) + 1))
    with pytest.raises(ValueError, match="image"):
        engine.submit(Request(make_requests(config, [(20, True, 5)])[0].input_ids))  # no pixels
    engine.start()
    assert engine.submit(c).wait(60) and len(c.tokens) == 50
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(d)


def test_prefill_ahead_streams_first_tokens_before_a_slot_frees(generator):
    config = generator.config
    specs = [(9, True, 12), (17, False, 6), (14, True, 9), (11, False, 1)]
    expected = [solo(generator, r, eos_token_id=[]) for r in make_requests(config, specs, seed=5)]
    engine = Engine(generator, max_batch=1, prefill_ahead=2, eos_ids=[])
    requests = make_requests(config, specs, seed=5)
    for r in requests:
        engine.submit(r)
    for _ in range(4):  # one prefill per step (max_prefill_rows defaults to max_batch)
        engine.step()
    # one slot: the first request decodes, two more got their first token, the fourth waits
    assert engine.busy_slots == 1 and [len(r.tokens) for r in requests] == [5, 1, 1, 0]
    assert engine.queue_length == 1
    while not all(r.finished for r in requests):
        engine.step()
    assert [r.tokens for r in requests] == expected
    assert engine.stats["largest_batch"] == 1
    no_ahead = Engine(generator, max_batch=1, prefill_ahead=0, eos_ids=[])
    late = make_requests(config, specs[:2], seed=5)
    for r in late:
        no_ahead.submit(r)
    no_ahead.step()
    assert [len(r.tokens) for r in late] == [2, 0]


def test_precompile_covers_every_greedy_decode_shape(generator):
    config = generator.config
    engine = Engine(generator, max_batch=4, eos_ids=[], max_context=128)
    assert engine.precompile() == len(engine.cache_lengths) == 2
    before = TRACE_COUNTS["engine_decode"]
    requests = make_requests(config, [(20, True, 30), (25, False, 60), (21, True, 8)], seed=8)
    run_staggered(engine, requests, [0, 1, 3])
    assert TRACE_COUNTS["engine_decode"] == before
    assert [r.tokens for r in requests] == [solo(generator, r, eos_token_id=[]) for r in requests]


def test_compiled_shapes_stay_bounded(generator):
    config = generator.config
    engine = Engine(generator, max_batch=4, eos_ids=[])
    run_staggered(engine, make_requests(config, [(20, True, 8), (25, False, 8), (21, True, 8)], seed=3), [0, 1, 3])
    before = dict(TRACE_COUNTS)
    # other prompt lengths in the same buckets, arriving at other steps: nothing new to compile
    requests = make_requests(config, [(22, True, 6), (27, False, 9), (18, True, 4)], seed=4)
    run_staggered(engine, requests, [0, 1, 3])
    assert {k: v for k, v in TRACE_COUNTS.items() if k.startswith("engine_decode")} == \
           {k: v for k, v in before.items() if k.startswith("engine_decode")}


# Run with tests/ as the working folder: `python -c` puts it first on sys.path, so the child
# imports this module for its helpers.
_SHARDED = textwrap.dedent("""
    from flax import nnx
    from llava_jax.infer.engine import Engine
    from llava_jax.infer.generate import Generator
    from llava_jax.models.llava import LlavaModel
    from llava_jax.recipes.tiny import tiny_llava_config
    from llava_jax.sharding import make_mesh
    import test_engine as T
    config = tiny_llava_config()
    model = LlavaModel(config, rngs=nnx.Rngs(3))
    specs = [(9, True, 6), (30, False, 14), (13, True, 9)]
    single = Generator(model)
    expected = [T.solo(single, r, eos_token_id=[]) for r in T.make_requests(config, specs)]
    sharded = Generator(model, mesh=make_mesh(data=1, fsdp=2, tensor=2))
    engine = Engine(sharded, max_batch=2, eos_ids=[])
    requests = T.make_requests(config, specs)
    T.run_staggered(engine, requests, [0, 2, 3])
    assert [r.tokens for r in requests] == expected, ([r.tokens for r in requests], expected)
    print("OK")
""")


@pytest.mark.slow  # a subprocess with 4 host devices: ~1 min on the contended 2-core machine
def test_engine_over_a_mesh_matches_single_device():
    out = run_python(_SHARDED, num_devices=4, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert "OK" in out, out[-2000:]


def test_eval_answering_through_the_engine_equals_batched_generate():
    """`answer_all` (slot engine, 2 slots for 5 questions) gives `answer_batch`'s answers."""
    import skimage.data
    from PIL import Image

    from llava_jax.eval.answering import answer_all, answer_batch, load_chat_model
    from llava_jax.testing.checkpoints import shared_tiny_checkpoint

    chat = load_chat_model(shared_tiny_checkpoint())
    photo = Image.fromarray(skimage.data.coffee()).resize((40, 30))
    questions = ["What is shown?", "How many?", "Describe the colour in detail.", "Is it red?", "Where?"]
    images = [photo, None, photo, None, photo]
    kw = dict(max_new_tokens=10)
    assert answer_all(chat, questions, images, batch_size=2, progress=False, **kw) == \
        answer_batch(chat, questions, images, **kw)
