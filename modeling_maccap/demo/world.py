"""A synthetic scene world for the offline demo: coloured shapes in the four quadrants of a small image, on varied
backgrounds. One large shape is the scene's salient object and the others are small; every caption names the
salient object and describes only part of the scene, as the captions of one COCO image share its main subject
and each leaves things out.

Everything is a pure function of (seed, part, index), so the world is the same on every machine. Parts are
disjoint streams of scenes: "clip" trains the tiny CLIP on (image, caption) pairs, "text" gives the captions
MacCap and its LM learn from (their images are used only by the upper bound), "test" is held out, and "lm_probe"
tells when the LM's pretraining may stop (no component trains on it).
"""

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 175, 60), "blue": (50, 90, 235), "yellow": (240, 215, 40),
           "white": (245, 245, 245), "purple": (150, 60, 195), "orange": (245, 140, 20), "cyan": (40, 210, 220),
           "pink": (245, 130, 190)}
SIZES = {"small": 0.2, "large": 0.36}  # shape extent as a fraction of the image side
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75)}
BACKGROUNDS = ("dark", "gray", "striped", "speckled")
PARTS = {"clip": 1, "text": 2, "test": 3, "lm_probe": 4}
# The parts whose captions include the salient object alone with its position. The captioning corpus ("text") and the
# references ("test") leave it out: the shortest caption that is always right, it was what the projector learned to
# write for every image (docs/demo/history.md, "Where the captions' variety is lost"). CLIP keeps it: without it,
# it did not learn the position.
SALIENT_ALONE_PARTS = ("clip",)
SUPERSAMPLE = 2  # shapes are drawn at 2x and averaged down, so their edges are anti-aliased


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self, with_size=True):
        return f"a {self.size} {self.colour} {self.shape}" if with_size else f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple
    background: str
    seed: int  # the scene's own random stream: background texture and position jitter

    @property
    def salient(self):
        return self.objects[0]

    def caption_choices(self, salient_alone=True):
        """Every caption of the scene: the salient object with its position or the background, or beside one
        other object; never all the scene shows. `salient_alone=False` leaves out the caption of the salient
        object and its position alone ("a red circle in the top left")."""
        s = self.salient
        # "on dark ground", not "on a dark background": the word before the background is then one no other
        # phrase has, as "the" before a position and "large" before a colour. After "on a" (whose "a" starts
        # every object too) the demo's LM learned to copy the background from its context only after 1600 steps
        # on seed 0, against 600 after "on" (README, the demo's step 1).
        where, on = f"in the {s.position}", f"on {self.background} ground"
        out = [f"{s.phrase(False)} {where}"] if salient_alone else []
        out += [f"{s.phrase()} {where} {on}", f"{s.phrase(False)} {where} {on}", f"{s.phrase()} {on}"]
        for other in self.objects[1:]:
            out += [f"{s.phrase(False)} and {other.phrase(False)}",
                    f"{s.phrase(False)} in the {s.position} and {other.phrase()}"]
        return out

    def captions(self, count, rng, salient_alone=True):
        """`count` distinct captions drawn from `caption_choices(salient_alone)`, in a random order."""
        choices = self.caption_choices(salient_alone)
        if count > len(choices):
            raise ValueError(f"this scene has {len(choices)} distinct captions, asked for {count}")
        return [choices[i] for i in rng.permutation(len(choices))[:count]]

    def render(self, side):
        """The scene as a (side, side, 3) uint8 array."""
        rng = np.random.default_rng(self.seed)
        big = side * SUPERSAMPLE
        image = _background(self.background, big, rng)
        y, x = _grid(big)
        for obj in self.objects:
            cx, cy = np.array(POSITIONS[obj.position]) + rng.uniform(-0.06, 0.06, size=2)
            half = SIZES[obj.size] / 2
            if obj.shape == "circle":
                mask = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
            elif obj.shape == "square":
                mask = (abs(x - cx) <= half * 0.9) & (abs(y - cy) <= half * 0.9)
            elif obj.shape == "diamond":
                mask = abs(x - cx) + abs(y - cy) <= half
            else:  # an upright triangle: apex at the top, base at the bottom
                mask = (y <= cy + half) & (abs(x - cx) <= (y - (cy - half)) / 2)
            image[mask] = COLOURS[obj.colour]
        big_image = Image.fromarray(image.clip(0, 255).round().astype(np.uint8))
        return np.asarray(big_image.resize((side, side), Image.Resampling.BOX))  # the mean of each 2x2 block


@functools.lru_cache(maxsize=4)
def _grid(big):
    """Pixel-centre coordinates in [0, 1] of a big x big canvas: (y, x)."""
    return (np.mgrid[0:big, 0:big].astype(np.float32) + 0.5) / big


def _background(kind, big, rng):
    shade = rng.uniform(0.8, 1.2)
    if kind == "dark":
        image = np.full((big, big, 3), 30.0 * shade)
    elif kind == "gray":
        image = np.full((big, big, 3), 128.0 * shade)
    elif kind == "striped":
        period = big // int(rng.integers(3, 6))
        stripes = (np.arange(big) // (period // 2)) % 2
        image = np.repeat((70 + 90 * stripes * shade)[:, None, None], big, 1).repeat(3, 2)
    else:  # speckled: coarse random grey noise
        cells = rng.uniform(40, 200, size=(big // 8, big // 8, 1))
        image = cells.repeat(8, 0).repeat(8, 1).repeat(3, 2)
    return image.astype(np.float32)


def sample_scene(seed, part, index):
    """Scene `index` of `part` ("clip", "text" or "test") in the world of `seed`: 2 or 3 objects in distinct
    quadrants with a random shape and colour each (the first large, the others small), on a random background."""
    scene_seed = int(np.random.SeedSequence([seed, PARTS[part], index]).generate_state(1)[0])
    rng = np.random.default_rng(scene_seed)
    count = int(rng.integers(2, 4))
    positions = rng.permutation(list(POSITIONS))[:count]
    kinds = [(shape, colour) for shape in SHAPES for colour in COLOURS]  # no two objects look alike
    chosen = rng.permutation(len(kinds))[:count]
    objects = tuple(  # the first is the salient object, the only large one
        SceneObject(shape=kinds[k][0], colour=kinds[k][1], size="large" if i == 0 else "small", position=str(position))
        for i, (k, position) in enumerate(zip(chosen, positions))
    )
    return Scene(objects=objects, background=str(rng.choice(BACKGROUNDS)), seed=scene_seed)


def sample_part(seed, part, count, captions_per_scene):
    """`count` scenes of `part` with their captions: a list of (scene, captions)."""
    out = []
    for index in range(count):
        scene = sample_scene(seed, part, index)
        rng = np.random.default_rng([seed, PARTS[part], index, 1])
        out.append((scene, scene.captions(captions_per_scene, rng, salient_alone=part in SALIENT_ALONE_PARTS)))
    return out


def salient_words_named(caption, scene):
    """Whether `caption` names the scene's salient object's colour, shape and position and the scene's background
    rightly, read from its first colour word, first shape word, first position and first background word (every
    caption of this world names the salient object first): {"colour": bool, "shape": bool, "position": bool or
    None where the caption names no position, "background": bool or None where it names no background}."""
    words = caption.split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    position = next((p for p in map(" ".join, zip(words, words[1:])) if p in POSITIONS), None)
    background = next((w for w in words if w in BACKGROUNDS), None)
    s = scene.salient
    return {"colour": colour == s.colour, "shape": shape == s.shape,
            "position": None if position is None else position == s.position,
            "background": None if background is None else background == scene.background}


def vocabulary():
    """Every word a caption can use."""
    words = {"a", "and", "in", "the", "on", "ground"} | set(SHAPES) | set(COLOURS) | set(SIZES)
    words |= {w for p in POSITIONS for w in p.split()} | set(BACKGROUNDS)
    return sorted(words)
