"""The demo's synthetic world: what its images show and what its captions say about them."""

import re

import numpy as np
import pytest

from modeling_maccap.demo import world
from modeling_maccap.tools.tiny import tiny_clip_tokenizer, tiny_lm_tokenizer

# The caption grammar, written independently of the generator: "a [size] colour shape [in the position]".
MENTION = re.compile(r"a (?:(small|large) )?(\w+) (circle|square|triangle|diamond)(?: in the (top left|top right|"
                     r"bottom left|bottom right))?")
BACKGROUND = re.compile(r" on (\w+) ground$")
QUADRANTS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


@pytest.fixture(scope="module")
def scenes():
    return world.sample_part(seed=0, part="test", count=60, captions_per_scene=5)


def test_every_caption_names_the_large_salient_object_first_then_at_most_one_other_and_never_all_it_shows(scenes):
    for scene, captions in scenes:
        assert len(set(captions)) == 5
        objects = {(o.colour, o.shape): o for o in scene.objects}
        large = [o for o in scene.objects if o.size == "large"]
        assert len(large) == 1
        for caption in captions:
            mentions = MENTION.findall(caption)
            assert 1 <= len(mentions) <= 2, caption
            assert mentions[0][1:3] == (large[0].colour, large[0].shape), caption
            for size, colour, shape, position in mentions:
                obj = objects[(colour, shape)]  # a KeyError here: the caption names an object the scene lacks
                assert size in ("", obj.size) and position in ("", obj.position), (caption, obj)
            background = BACKGROUND.search(caption)
            assert background is None or background.group(1) == scene.background
            # Partial: some object, size, position or the background is left out.
            said = {(c, s) for _, c, s, _ in mentions}
            full = (said == set(objects) and all(size and position for size, _, _, position in mentions)
                    and background is not None)
            assert not full, caption


def _close_to(image, rgb, tolerance=30):
    return (np.abs(image.astype(int) - np.array(rgb)).max(-1) <= tolerance)


def test_each_object_is_drawn_in_its_quadrant_in_its_colour_and_size(scenes):
    side = 32
    for scene, _ in scenes:
        image = scene.render(side)
        assert image.shape == (side, side, 3) and image.dtype == np.uint8
        for obj in scene.objects:
            row, col = QUADRANTS[obj.position]
            quadrants = _close_to(image, world.COLOURS[obj.colour]).reshape(2, side // 2, 2, side // 2)
            pixels = quadrants.sum((1, 3))
            area = pixels[row, col]
            # A small shape spans 20% of the side (6.4 px), a large one 36% (11.5 px); a triangle covers half its
            # box, a circle pi/4 of it, a diamond half; anti-aliased edges fall outside the tolerance.
            assert (10 <= area <= 40) if obj.size == "small" else (area >= 45), (obj, area)
            same_colour = [QUADRANTS[o.position] for o in scene.objects if o.colour == obj.colour]
            elsewhere = sum(pixels[q] for q in QUADRANTS.values() if q not in same_colour)
            assert elsewhere <= 4, obj  # nothing of that colour where no such object is


def test_scenes_have_two_or_three_distinct_objects_in_distinct_quadrants_and_every_background_occurs(scenes):
    for scene, _ in scenes:
        assert 2 <= len(scene.objects) <= 3
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
    assert {scene.background for scene, _ in scenes} == set(world.BACKGROUNDS)
    assert {o.size for scene, _ in scenes for o in scene.objects} == set(world.SIZES)


def test_the_world_is_a_function_of_seed_part_and_index():
    first = world.sample_part(seed=3, part="clip", count=20, captions_per_scene=4)
    again = world.sample_part(seed=3, part="clip", count=20, captions_per_scene=4)
    assert [c for _, c in first] == [c for _, c in again]
    assert all(np.array_equal(a.render(32), b.render(32)) for (a, _), (b, _) in zip(first, again))
    other_part = world.sample_part(seed=3, part="text", count=20, captions_per_scene=4)
    other_seed = world.sample_part(seed=4, part="clip", count=20, captions_per_scene=4)
    for other in (other_part, other_seed):
        same = sum(np.array_equal(a.render(32), b.render(32)) for (a, _), (b, _) in zip(first, other))
        assert same == 0


def test_a_scene_has_four_captions_of_its_salient_object_alone_and_two_per_other_object_and_refuses_more():
    scene = world.sample_scene(0, "test", 0)
    count = 4 + 2 * (len(scene.objects) - 1)
    assert len(set(scene.captions(count, np.random.default_rng(0)))) == count
    with pytest.raises(ValueError, match=f"this scene has {count} distinct captions, asked for {count + 1}"):
        scene.captions(count + 1, np.random.default_rng(0))
    # Without the salient object alone with its position, one fewer.
    assert len(set(scene.captions(count - 1, np.random.default_rng(0), salient_alone=False))) == count - 1
    with pytest.raises(ValueError, match=f"this scene has {count - 1} distinct captions, asked for {count}"):
        scene.captions(count, np.random.default_rng(0), salient_alone=False)


def test_only_the_clip_part_captions_the_salient_object_alone_with_its_position():
    alone = re.compile(r"^a (\w+) (\w+) in the (top|bottom) (left|right)$")  # no size, background or other object
    for part in ("clip", "text", "test"):
        captions = [c for _, cs in world.sample_part(seed=0, part=part, count=200, captions_per_scene=5) for c in cs]
        share = sum(bool(alone.match(c)) for c in captions) / len(captions)
        if part == "clip":  # 1 of a scene's 6 or 8 captions, 5 drawn: about 5/7 of scenes have it, one each
            assert 0.1 < share < 0.2, share
        else:
            assert share == 0, part


def test_the_demo_tokenizers_read_every_word_of_the_world_as_one_token(scenes):
    words = world.vocabulary()
    assert {w for _, captions in scenes for c in captions for w in c.split()} <= set(words)
    clip, lm = tiny_clip_tokenizer(words, context_length=32), tiny_lm_tokenizer(words)
    for caption in (c for _, captions in scenes[:10] for c in captions):
        assert len(clip.tokenize(caption)) == len(caption.split())
        assert len(lm.tokenize(caption)) == len(caption.split())
        assert lm.decode(lm(caption)["input_ids"]) == caption
    assert clip.model_max_length == 32


def test_a_caption_is_read_for_the_salient_colour_shape_position_and_the_background_from_its_first_mention():
    salient = world.SceneObject(shape="circle", colour="red", size="large", position="top left")
    other = world.SceneObject(shape="square", colour="blue", size="small", position="bottom right")
    scene = world.Scene(objects=(salient, other), background="dark", seed=0)
    named = world.salient_words_named
    assert named("a large red circle in the top left on dark ground", scene) == {
        "colour": True, "shape": True, "position": True, "background": True}
    assert named("a large red circle on striped ground", scene) == {
        "colour": True, "shape": True, "position": None, "background": False}
    # The first colour and shape decide, not a later object's; a caption without a position or background names none.
    assert named("a blue circle and a small red square", scene) == {"colour": False, "shape": True, "position": None,
                                                                     "background": None}
    assert named("a red square in the bottom right and a small red circle", scene) == {
        "colour": True, "shape": False, "position": False, "background": None}
    # A generated caption may break the grammar: words outside a position phrase do not count as one.
    assert named("top a red left circle", scene) == {"colour": True, "shape": True, "position": None,
                                                     "background": None}
    assert named("", scene) == {"colour": False, "shape": False, "position": None, "background": None}
    # Every reference caption of a scene names its salient object rightly.
    for scene, captions in world.sample_part(seed=0, part="test", count=20, captions_per_scene=5):
        for caption in captions:
            words = named(caption, scene)
            assert words["colour"] and words["shape"] and words["position"] in (True, None)
            assert words["background"] in (True, None)
