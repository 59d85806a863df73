"""Synthetic scenes and questions for the toy VQA benchmark.

A scene is a background with two to four large flat objects.  Every shape and every color
occurs at most once per scene, so "the circle" or "the blue object" always names a single
object.  Each object covers roughly 8-16 of the 144 patches of a 168 px image, so most
patches carry no answer.  The background's ``style`` is ``"flat"`` (the benchmark's: calm,
nearly uniform) or ``"textured"`` (toy v3: low-contrast stripes, checks, blotches or
gradients in varied pale hues, stronger pixel noise, and 0-3 small grey/brown marks that
are background, never objects).

Example:
    >>> from vtc.eval.toy.scenes import generate
    >>> recs = generate(3, seed=0)
    >>> recs[0].kind in {"color", "shape", "presence"}
    True
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 168
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 215),
    "yellow": (230, 195, 30),
    "purple": (135, 55, 175),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

REQUIRED_KINDS: tuple[str, ...] = ("color", "shape", "presence")
EXTRA_KINDS: tuple[str, ...] = ("count", "left_of")
ALL_KINDS: tuple[str, ...] = REQUIRED_KINDS + EXTRA_KINDS

TEMPLATES: dict[str, str] = {
    "color": "what color is the {shape}?",
    "shape": "what shape is the {color} object?",
    "presence": "is there a {color} {shape}?",
    "count": "how many objects are there?",
    "left_of": "is the {shape} left of the {other}?",
}

_BACKGROUNDS = ((236, 236, 232), (228, 232, 236), (238, 234, 224), (226, 226, 226))
STYLES: tuple[str, ...] = ("flat", "textured")
TEXTURES: tuple[str, ...] = ("stripes", "checks", "blotches", "gradient")
# Distractor marks of the textured style: greys and browns that no question names, at least 90
# (RGB distance) from every object color, mostly darker than the pale textured backgrounds.
MARK_COLORS: dict[str, tuple[int, int, int]] = {
    "grey": (100, 100, 100),
    "dark grey": (62, 62, 66),
    "brown": (120, 82, 50),
    "dark brown": (84, 60, 42),
    "tan": (158, 122, 84),
}
MARK_KINDS: tuple[str, ...] = ("dot", "dash", "ring")
_MIN_BG_DISTANCE = 100.0  # textured backgrounds: RGB distance of both tones from every object color
_MIN_SIZE, _MAX_SIZE = 40, 56
_MIN_LEFT_GAP = 20  # px between centers for an unambiguous left/right question


@dataclass(frozen=True)
class SceneObject:
    """One flat object: ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, ``center`` its middle.

    Example:
        >>> SceneObject("circle", "red", (0, 0, 40, 40)).center
        (20.0, 20.0)
    """

    shape: str
    color: str
    bbox: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass(frozen=True)
class TextureLayer:
    """One layer of a textured background: a field in [0, 1] (``kind`` in ``TEXTURES``) scaled by
    ``amp``; ``period`` (px) is the stripes' or checks' period or the blotches' scale, ``angle``
    (radians) the stripes' or gradient's direction, ``phase`` the stripes' phase or the checks'
    offset (px); ``hard``: square-wave stripes instead of a sinusoid.

    Example:
        >>> TextureLayer("stripes", 1.0, 12.0, 0.5, 0.0).kind
        'stripes'
    """

    kind: str
    amp: float
    period: float
    angle: float
    phase: float
    hard: bool = False


@dataclass(frozen=True)
class Mark:
    """A small distractor mark of the textured style (background: never labelled, never asked about);
    ``kind`` in ``MARK_KINDS``, ``color`` a key of ``MARK_COLORS``, ``bbox`` ``(x0, y0, x1, y1)``.

    Example:
        >>> Mark("dot", "brown", (5, 5, 13, 13)).color
        'brown'
    """

    kind: str
    color: str
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """A scene description: enough to render the image and to recompute every answer.

    ``style`` ``"flat"`` uses ``background``, ``noise_seed`` and ``size`` only; ``"textured"``
    blends ``background`` with ``tone`` through the ``texture`` layers, adds pixel noise of
    ``noise_sigma`` and draws the distractor ``marks`` (random fields come from ``noise_seed``).

    Example:
        >>> s = Scene((230, 230, 230), (SceneObject("square", "blue", (10, 10, 60, 60)),), 3)
        >>> s.find(shape="square").color, s.style
        ('blue', 'flat')
    """

    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    noise_seed: int
    size: int = IMAGE_SIZE
    # Textured style only.  Plain defaults (class attributes), so scenes pickled before these
    # fields existed (training caches) load as flat scenes.
    style: str = "flat"
    tone: tuple[int, int, int] | None = None
    texture: tuple[TextureLayer, ...] = ()
    noise_sigma: float = 3.0
    marks: tuple[Mark, ...] = ()

    def find(self, shape: str | None = None, color: str | None = None) -> SceneObject | None:
        """The object with this shape and/or color, or None."""
        for obj in self.objects:
            if (shape is None or obj.shape == shape) and (color is None or obj.color == color):
                return obj
        return None


@dataclass
class Record:
    """One benchmark question about one image.

    Example:
        >>> r = generate(1, seed=1)[0]
        >>> isinstance(r.answer, str) and " " not in r.answer
        True
    """

    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: Scene
    params: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- scenes


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _pale_color(rng: random.Random, value: float) -> tuple[int, int, int]:
    """A low-saturation color of brightness ``value`` (0-1) and random hue."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.03, 0.22), value)
    return (round(r * 255), round(g * 255), round(b * 255))


def _far_from_objects(color: tuple[int, int, int]) -> bool:
    return all(math.dist(color, c) >= _MIN_BG_DISTANCE for c in COLORS.values())


def _textured_background(rng: random.Random, size: int) -> dict:
    """Two pale tones, 1-2 texture layers and the noise level of a textured scene."""
    while True:
        value = rng.uniform(0.6, 0.93)
        background = _pale_color(rng, value)
        tone = _pale_color(rng, min(0.97, max(0.55, value + rng.choice((-1, 1)) * rng.uniform(0.05, 0.16))))
        if _far_from_objects(background) and _far_from_objects(tone) and 15 <= math.dist(background, tone) <= 60:
            break
    kinds = rng.sample(TEXTURES, rng.choice((1, 2)))
    amps = [1.0] if len(kinds) == 1 else [a := rng.uniform(0.35, 0.65), 1.0 - a]
    layers = tuple(
        TextureLayer(
            kind,
            round(amp, 3),
            round(rng.uniform(6.0, 30.0) if kind in ("stripes", "checks") else rng.uniform(14.0, 48.0), 2),
            round(rng.uniform(0, math.pi), 3),
            round(rng.uniform(0, 2 * math.pi) if kind == "stripes" else float(rng.randrange(size)), 3),
            kind == "stripes" and rng.random() < 0.4,
        )
        for kind, amp in zip(kinds, amps, strict=True)
    )
    return {"tone": tone, "texture": layers, "noise_sigma": round(rng.uniform(6.0, 10.0), 2), "background": background}


def _place_marks(rng: random.Random, boxes: list[tuple[int, int, int, int]], size: int) -> tuple[Mark, ...]:
    """0-3 small marks on the background, clear of every object's box (3 px) and of each other."""
    marks: list[Mark] = []
    taken = list(boxes)
    for _ in range(rng.randint(0, 3)):
        kind, color = rng.choice(MARK_KINDS), rng.choice(tuple(MARK_COLORS))
        for _attempt in range(50):
            if kind == "dash":
                long, thin = rng.randint(10, 16), rng.randint(3, 4)
                w, h = (long, thin) if rng.random() < 0.5 else (thin, long)
            else:
                w = h = rng.randint(6, 12) if kind == "dot" else rng.randint(10, 14)
            x0, y0 = rng.randint(1, size - w - 1), rng.randint(1, size - h - 1)
            box = (x0, y0, x0 + w, y0 + h)
            if all(not _overlaps(box, b, 3) for b in taken):
                marks.append(Mark(kind, color, box))
                taken.append(box)
                break
    return tuple(marks)


def make_scene(rng: random.Random, n_objects: int | None = None, size: int = IMAGE_SIZE, style: str = "flat") -> Scene:
    """Sample a ``size`` px square scene with ``n_objects`` (default: 2-4) non-overlapping objects
    (of the same sizes at any ``size``: a larger scene has more background), on a background of
    ``style`` (``STYLES``; ``"flat"`` draws exactly what it always drew from ``rng``).

    Example:
        >>> len(make_scene(random.Random(0), n_objects=3).objects)
        3
        >>> render(make_scene(random.Random(0), size=224)).size
        (224, 224)
        >>> make_scene(random.Random(0), style="textured").style
        'textured'
    """
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; expected one of {STYLES}")
    n = n_objects if n_objects is not None else rng.randint(2, 4)
    while True:
        shapes = rng.sample(SHAPES, n)
        colors = rng.sample(COLOR_NAMES, n)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            for _attempt in range(100):
                side = rng.randint(_MIN_SIZE, _MAX_SIZE)
                x0 = rng.randint(2, size - side - 2)
                y0 = rng.randint(2, size - side - 2)
                box = (x0, y0, x0 + side, y0 + side)
                if all(not _overlaps(box, b, 4) for b in boxes):
                    boxes.append(box)
                    break
        if len(boxes) == n:
            break
    objects = tuple(SceneObject(s, c, b) for s, c, b in zip(shapes, colors, boxes, strict=True))
    if style == "flat":
        return Scene(rng.choice(_BACKGROUNDS), objects, rng.randrange(2**31), size)
    bg = _textured_background(rng, size)
    noise_seed = rng.randrange(2**31)
    return Scene(bg.pop("background"), objects, noise_seed, size, style, marks=_place_marks(rng, boxes, size), **bg)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: int | tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = obj.bbox
    w = x1 - x0
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        m = round(w * 0.08)
        draw.rectangle((x0 + m, y0 + m, x1 - 1 - m, y1 - 1 - m), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif obj.shape == "cross":
        t = round(w * 0.34)
        a = x0 + (w - t) // 2
        b = y0 + (w - t) // 2
        draw.rectangle((a, y0, a + t - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, b, x1 - 1, b + t - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _texture_field(layer: TextureLayer, size: int, nrng: np.random.Generator) -> np.ndarray:
    """``(size, size)`` field in [0, 1] of one texture layer."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if layer.kind == "stripes":
        wave = np.sin(2 * np.pi * (xx * np.cos(layer.angle) + yy * np.sin(layer.angle)) / layer.period + layer.phase)
        return (wave > 0).astype(np.float32) if layer.hard else 0.5 + 0.5 * wave
    if layer.kind == "checks":
        cells = np.floor((xx + layer.phase) / layer.period) + np.floor((yy + layer.phase) / layer.period)
        return (cells % 2).astype(np.float32)
    if layer.kind == "blotches":
        cells = int(math.ceil(size / layer.period)) + 1
        coarse = nrng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
        side = max(size, math.ceil(cells * layer.period))
        big = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)  # float32 -> mode "F"
        return np.clip(np.asarray(big)[:size, :size], 0.0, 1.0)
    if layer.kind == "gradient":
        ramp = xx * np.cos(layer.angle) + yy * np.sin(layer.angle)
        return (ramp - ramp.min()) / max(1e-6, float(ramp.max() - ramp.min()))
    raise ValueError(f"unknown texture {layer.kind!r}; expected one of {TEXTURES}")


def _draw_mark(draw: ImageDraw.ImageDraw, mark: Mark) -> None:
    x0, y0, x1, y1 = mark.bbox
    fill = MARK_COLORS[mark.color]
    if mark.kind == "dot":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif mark.kind == "dash":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif mark.kind == "ring":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), outline=fill, width=2)
    else:
        raise ValueError(f"unknown mark {mark.kind!r}; expected one of {MARK_KINDS}")


def _render_textured(scene: Scene) -> Image.Image:
    nrng = np.random.default_rng(scene.noise_seed)
    field = np.zeros((scene.size, scene.size), dtype=np.float32)
    for layer in scene.texture:
        field += layer.amp * _texture_field(layer, scene.size, nrng)
    low, high = np.array(scene.background, np.float32), np.array(scene.tone, np.float32)
    arr = low + np.clip(field, 0.0, 1.0)[..., None] * (high - low)
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for mark in scene.marks:
        _draw_mark(draw, mark)
    for obj in scene.objects:
        jitter = nrng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLORS[obj.color], jitter, strict=True))
        _draw_object(draw, obj, fill)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + nrng.normal(0.0, scene.noise_sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def render(scene: Scene) -> Image.Image:
    """Render a scene to an RGB image (deterministic: the noise comes from ``scene.noise_seed``).

    Example:
        >>> render(make_scene(random.Random(0))).size
        (168, 168)
        >>> import numpy as np
        >>> s = make_scene(random.Random(0), style="textured")
        >>> np.array_equal(np.asarray(render(s)), np.asarray(render(s)))
        True
    """
    if scene.style == "textured":
        return _render_textured(scene)
    if scene.style != "flat":
        raise ValueError(f"unknown scene style {scene.style!r}; expected one of {STYLES}")
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    nrng = np.random.default_rng(scene.noise_seed)
    for obj in scene.objects:
        jitter = nrng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLORS[obj.color], jitter, strict=True))
        _draw_object(draw, obj, fill)
    arr = np.asarray(img, dtype=np.float32)
    # Calm background: a faint smooth gradient plus mild pixel noise.
    ramp = np.linspace(-6.0, 6.0, scene.size, dtype=np.float32)
    angle = nrng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None]
    arr = arr + grad + nrng.normal(0.0, 3.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def object_index_map(scene: Scene) -> np.ndarray:
    """``(size, size)`` uint8 map: 0 for background, ``i + 1`` where object ``i`` is drawn.

    Example:
        >>> m = object_index_map(make_scene(random.Random(0), n_objects=2))
        >>> sorted(set(m.ravel().tolist()))
        [0, 1, 2]
    """
    img = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        _draw_object(draw, obj, i + 1)
    return np.asarray(img)


def patch_labels(scene: Scene, patch_size: int = PATCH_SIZE, min_cover: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch (color, shape) class ids in row-major patch order; 0 = background.

    A patch takes the object covering most of it when that covers at least ``min_cover``
    of the patch.  Color ids index ``COLOR_NAMES`` + 1, shape ids ``SHAPES`` + 1.

    Example:
        >>> c, s = patch_labels(make_scene(random.Random(0)))
        >>> c.shape, int((s > 0).sum()) > 0
        ((144,), True)
    """
    m = object_index_map(scene)
    g = scene.size // patch_size
    blocks = m[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(g * g, patch_size * patch_size)
    n = len(scene.objects)
    counts = np.stack([(blocks == i + 1).sum(1) for i in range(n)], 1) / blocks.shape[1]
    best = counts.argmax(1)
    covered = counts.max(1) >= min_cover
    color_of = np.array([COLOR_NAMES.index(o.color) + 1 for o in scene.objects])
    shape_of = np.array([SHAPES.index(o.shape) + 1 for o in scene.objects])
    colors = np.where(covered, color_of[best], 0).astype(np.int64)
    shapes = np.where(covered, shape_of[best], 0).astype(np.int64)
    return colors, shapes


# -------------------------------------------------------------------------- questions


def _left_pairs(scene: Scene) -> list[tuple[SceneObject, SceneObject]]:
    return [
        (a, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b and abs(a.center[0] - b.center[0]) >= _MIN_LEFT_GAP
    ]


def can_ask(scene: Scene, kind: str) -> bool:
    """Whether a question of ``kind`` has an unambiguous answer for this scene."""
    return kind != "left_of" or bool(_left_pairs(scene))


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str, dict[str, str]]:
    """Sample a question of ``kind`` about ``scene``: ``(question, answer, params)``.

    Presence questions are balanced yes/no; half of the "no" questions are hard negatives
    (the color and the shape both occur, on different objects).

    Example:
        >>> s = make_scene(random.Random(0))
        >>> q, a, p = ask(s, "color", random.Random(1))
        >>> a == s.find(shape=p["shape"]).color
        True
    """
    if kind == "color":
        obj = rng.choice(scene.objects)
        return TEMPLATES["color"].format(shape=obj.shape), obj.color, {"shape": obj.shape}
    if kind == "shape":
        obj = rng.choice(scene.objects)
        return TEMPLATES["shape"].format(color=obj.color), obj.shape, {"color": obj.color}
    if kind == "presence":
        if rng.random() < 0.5:
            obj = rng.choice(scene.objects)
            color, shape, ans = obj.color, obj.shape, "yes"
        else:
            present = {(o.color, o.shape) for o in scene.objects}
            hard = [(a.color, b.shape) for a in scene.objects for b in scene.objects if a is not b]
            pool = (
                hard
                if hard and rng.random() < 0.5
                else [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            )
            color, shape = rng.choice(pool)
            ans = "no"
        q = TEMPLATES["presence"].format(color=color, shape=shape)
        return q, ans, {"color": color, "shape": shape}
    if kind == "count":
        return TEMPLATES["count"], NUMBER_WORDS[len(scene.objects)], {}
    if kind == "left_of":
        a, b = rng.choice(_left_pairs(scene))
        ans = "yes" if a.center[0] < b.center[0] else "no"
        return TEMPLATES["left_of"].format(shape=a.shape, other=b.shape), ans, {"shape": a.shape, "other": b.shape}
    raise ValueError(f"unknown kind {kind!r}; expected one of {ALL_KINDS}")


def asked_objects(scene: Scene, kind: str, params: dict[str, str]) -> list[SceneObject]:
    """The objects a question is about: the one named (color, shape), those sharing the asked color
    or shape (presence: a hard "no" needs both), the two compared (left_of), every object (count).

    Example:
        >>> s = make_scene(random.Random(0))
        >>> q, a, p = ask(s, "color", random.Random(1))
        >>> [o.color for o in asked_objects(s, "color", p)] == [a]
        True
    """
    objs = scene.objects
    if kind == "color":
        return [o for o in objs if o.shape == params["shape"]]
    if kind == "shape":
        return [o for o in objs if o.color == params["color"]]
    if kind == "presence":
        return [o for o in objs if o.color == params["color"] or o.shape == params["shape"]]
    if kind == "left_of":
        return [o for o in objs if o.shape in (params["shape"], params["other"])]
    return list(objs)


def asked_tokens(record: Record, patch_size: int = PATCH_SIZE, min_cover: float = 0.3) -> np.ndarray:
    """Per image token (row-major, ``patch_size`` px), whether an object the question is about covers at
    least ``min_cover`` of it: the tokens a model should answer from (the toy's instrument checks drop
    them and expect no better than chance).

    Example:
        >>> r = generate(1, seed=0)[0]
        >>> mask = asked_tokens(r)
        >>> mask.shape, bool(mask.any())
        ((144,), True)
    """
    scene = record.scene
    asked = {i + 1 for i, o in enumerate(scene.objects) if o in asked_objects(scene, record.kind, record.params)}
    m = object_index_map(scene)
    g = scene.size // patch_size
    blocks = m[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(g * g, patch_size * patch_size)
    return np.isin(blocks, sorted(asked)).mean(1) >= min_cover


def generate(
    n: int,
    seed: int,
    kinds: tuple[str, ...] = REQUIRED_KINDS,
    sizes: tuple[int, ...] = (IMAGE_SIZE,),
    style: str = "flat",
) -> list[Record]:
    """``n`` benchmark records, one image each, kinds cycling through ``kinds`` and image sizes (px,
    square) through ``sizes``, backgrounds of ``style`` (``STYLES``); deterministic in ``seed``.

    Example:
        >>> recs = generate(6, seed=123)
        >>> [r.kind for r in recs[:3]]
        ['color', 'shape', 'presence']
        >>> generate(2, seed=5)[1].question == generate(2, seed=5)[1].question
        True
    """
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind, size = kinds[i % len(kinds)], sizes[i % len(sizes)]
        scene = make_scene(rng, size=size, style=style)
        while not can_ask(scene, kind):
            scene = make_scene(rng, size=size, style=style)
        question, answer, params = ask(scene, kind, rng)
        records.append(Record(render(scene), question, answer, kind, scene, params))
    return records
