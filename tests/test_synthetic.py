"""The synthetic world: determinism, pixels vs annotations, language vs annotations."""
import json

import numpy as np
import pytest

from llava_jax.data import synthetic as S

SCENES = S.make_scenes(seed=3, count=60, split="train", image_size=64)


def test_same_seed_same_world_and_other_seeds_or_splits_differ():
    again = S.make_scenes(seed=3, count=60, split="train", image_size=64)
    assert again == SCENES
    for a, b in zip(SCENES, again):
        assert np.array_equal(np.asarray(S.render(a)), np.asarray(S.render(b)))
        assert S.captions(a) == S.captions(b) and S.questions(a) == S.questions(b)
    # A scene depends only on (seed, split, index), not on how many were generated before it.
    assert S.make_scene(3, 41, "train", 64) == SCENES[41]
    other_seed = S.make_scenes(seed=4, count=60, split="train", image_size=64)
    held_out = S.make_scenes(seed=3, count=60, split="eval", image_size=64)
    for other in (other_seed, held_out):
        same = sum(np.array_equal(np.asarray(S.render(a)), np.asarray(S.render(b))) for a, b in zip(SCENES, other))
        assert same < 3


def test_world_covers_every_attribute():
    objects = [o for s in SCENES for o in s.objects]
    assert {o.shape for o in objects} == set(S.SHAPES)
    assert {o.color for o in objects} == set(S.COLORS)
    assert {o.position for o in objects} == set(S.POSITIONS)
    assert {len(s.objects) for s in SCENES} == set(range(1, S.MAX_OBJECTS + 1))
    assert {s.background for s in SCENES} == set(S.BACKGROUNDS)


@pytest.mark.parametrize("image_size", [32, 64])
def test_boxes_match_rendered_pixels(image_size):
    for scene in S.make_scenes(seed=5, count=40, image_size=image_size):
        pixels = np.asarray(S.render(scene)).astype(int)
        assert pixels.shape == (image_size, image_size, 3)
        background = np.all(pixels == S.BACKGROUNDS[scene.background], axis=-1)
        covered = np.zeros_like(background)
        for obj in scene.objects:
            mine = np.all(pixels == S.COLORS[obj.color], axis=-1)
            ys, xs = np.nonzero(mine)
            assert len(xs) > 0, f"{scene.id}: {obj.name} has no pixels"
            # The annotated box is exactly the tight extent of the object's pixels.
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box, scene.id
            # The named quadrant holds the box centre.
            cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
            row, col = int(cy >= image_size / 2), int(cx >= image_size / 2)
            assert S.POSITIONS[2 * row + col] == obj.position, scene.id
            covered |= mine
        # Every pixel is background or belongs to an annotated object: nothing unannotated is drawn.
        assert np.all(background | covered), scene.id
        # Boxes of different objects are disjoint, so no object hides another.
        boxes = [o.box for o in scene.objects]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], scene.id


def test_sizes_are_distinguishable_by_box_area():
    small = [(o.box[2] - o.box[0]) for s in SCENES for o in s.objects if o.size == "small"]
    large = [(o.box[2] - o.box[0]) for s in SCENES for o in s.objects if o.size == "large"]
    assert max(small) < min(large)


def test_captions_name_exactly_the_objects_and_background():
    for scene in SCENES:
        caps = S.captions(scene)
        assert len(caps) == 5 and len(set(caps)) == 5
        truth = {(o.color, o.shape) for o in scene.objects}
        for caption in caps:
            assert S.mentioned_objects(caption) == truth, (scene.id, caption)
            assert scene.background in caption
            for obj in scene.objects:  # any position or size a caption states is the object's own
                for pos in S.POSITIONS:
                    if f"{obj.name} at the {pos}" in caption or f"{obj.name} in the {pos}" in caption:
                        assert pos == obj.position, (scene.id, caption)
                for size in S.SIZES:
                    if f"{size} {obj.name}" in caption:
                        assert size == obj.size, (scene.id, caption)


def test_questions_have_the_annotated_answers():
    for scene in SCENES:
        qs = S.questions(scene)
        assert len(qs) == 1 + 3 * len(scene.objects)
        for q in qs:
            assert q.answer in S.QUESTION_OPTIONS[q.type]
            if q.type == "count":
                assert q.answer == str(len(scene.objects))
            elif q.type == "color":
                shape = next(s for s in S.SHAPES if s in q.question)
                assert scene.object_by(shape=shape).color == q.answer
            elif q.type == "shape":
                color = next(c for c in S.COLORS if c in q.question)
                assert scene.object_by(color=color).shape == q.answer
            else:
                (color, shape), = S.mentioned_objects(q.question)
                assert scene.object_by(color=color, shape=shape).position == q.answer
    canonical = S.questions(SCENES[0], canonical=True)
    assert all(q.question == S._PHRASINGS[q.type][0].format(shape=o.shape, color=o.color, name=o.name)
               for q, o in zip(canonical[1::3], SCENES[0].objects))


def test_chance_and_grading():
    assert S.chance_accuracy("color") == pytest.approx(1 / 6)
    assert max(S.chance_accuracy(t) for t in S.QUESTION_OPTIONS) <= 0.25
    assert S.grade("color", "Red.", "red")
    assert S.grade("color", "The circle is red.", "red")
    assert not S.grade("color", "red or blue", "red")
    assert not S.grade("color", "reddish", "red")
    assert S.grade("count", "There are three shapes.", "3")
    assert S.grade("position", "top left", "top left")
    assert not S.grade("position", "top right", "top left")


def test_coco_files_round_trip_through_the_datagen_reader(tmp_path):
    from llava_jax.datagen.context import load_coco_contexts

    scenes = SCENES[:6]
    instances, captions = S.write_world(str(tmp_path), scenes)
    contexts = load_coco_contexts(instances, captions)
    assert [c.file_name for c in contexts] == [s.file_name for s in scenes]
    for context, scene in zip(contexts, scenes):
        assert (tmp_path / context.file_name).exists()
        assert list(context.captions) == S.captions(scene)
        assert len(context.boxes) == len(scene.objects)
        for box, obj in zip(context.boxes, scene.objects):
            assert box.category == obj.name
            assert (box.x1, box.y1, box.x2, box.y2) == tuple(round(v / 64, 3) for v in obj.box)
