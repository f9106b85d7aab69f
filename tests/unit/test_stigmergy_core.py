"""The pheromone field without sockets: the guide's 6.1-6.3, the tick's
conservation and decay, sensing, limits and every bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.stigmergy.core import (
    Aggregation,
    FieldSettings,
    PheromoneField,
    ReplayGuard,
    TokenBucket,
    diffuse_and_decay,
    load_snapshot,
    save_snapshot,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


WALL = 1_700_000_000.0


def make_field(**overrides: object) -> PheromoneField:
    values: dict[str, object] = {"deposit_rate": 1e9, "deposit_burst": 1e9}
    values.update(overrides)
    return PheromoneField(FieldSettings(**values), wall_clock=lambda: WALL)  # type: ignore[arg-type]


_counter = iter(range(10**9))


def deposit(
    field: PheromoneField,
    x: float,
    y: float,
    kind: str = "food",
    amount: float = 1.0,
    agent: str = "scout-001",
):  # type: ignore[no-untyped-def]
    """A deposit the servicer would have verified (fresh replay key each time)."""
    return field.deposit(
        agent,
        x,
        y,
        kind,
        amount,
        issue_ns=int(WALL * 1e9),
        replay_key=str(next(_counter)).encode(),
    )


def toward(x: float, y: float, tx: float, ty: float) -> tuple[float, float]:
    d = math.hypot(tx - x, ty - y)
    return (tx - x) / d, (ty - y) / d


# --- the guide's section 6 -----------------------------------------------------------------


def test_guide_6_1_agents_around_a_deposit_follow_the_gradient_toward_it() -> None:
    field = make_field(decay_rate=0.1, diffusion_rate=0.05)
    deposit(field, 500, 500, "food_source")
    assert field.read(500, 500, "food_source") == pytest.approx(1.0)
    # The guide's nearby agents and a ring of others at 2..140 cells, in every direction.
    agents = [(400, 450), (550, 520)]
    agents += [
        (500 + r * math.cos(a), 500 + r * math.sin(a))
        for r in (2, 10, 60, 140)
        for a in np.linspace(0, 2 * math.pi, 12, endpoint=False)
    ]
    for x, y in agents:
        g = field.gradient(x, y, "food_source")
        assert not g.flat, (x, y)
        ex, ey = toward(int(x) + 0.0, int(y) + 0.0, 500, 500)
        assert g.dx * ex + g.dy * ey > 0.99, ((x, y), (g.dx, g.dy))
    # Far beyond the sensing radius there is nothing to follow.
    assert field.gradient(100, 100, "food_source").flat
    assert (
        field.gradient(100, 100, "food_source").dx,
        field.gradient(100, 100, "food_source").dy,
    ) == (0, 0)

    # Agents that keep following it arrive, while the field decays and diffuses.
    positions = [(400.0, 450.0), (550.0, 520.0), (380.0, 560.0), (620.0, 410.0)]
    for step in range(40):
        moved = []
        for x, y in positions:
            g = field.gradient(x, y, "food_source")
            moved.append((x + 4 * g.dx, y + 4 * g.dy))
        positions = moved
        if step % 4 == 0:
            field.tick()
    for x, y in positions:
        assert math.hypot(x - 500.5, y - 500.5) < 5, (x, y)


def test_guide_6_2_food_attracts_and_danger_repels_when_negated() -> None:
    field = make_field()
    deposit(field, 100, 100, "food", agent="agent-001")
    deposit(field, 500, 500, "danger", agent="agent-002")
    deposit(field, 800, 800, "success_path", agent="agent-003")
    food = field.gradient(200, 200, "food")
    danger = field.gradient(450, 450, "danger")
    assert (food.dx, food.dy) == pytest.approx((-math.sqrt(0.5), -math.sqrt(0.5)), abs=1e-9)
    assert (danger.dx, danger.dy) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)), abs=1e-9)
    avoid = (-danger.dx, -danger.dy)
    # Types do not mix: the food layer knows nothing of the danger.
    assert field.gradient(450, 450, "food").flat
    # An agent attracted by food and repelled by danger ends up nearer the one
    # and further from the other.
    x, y = 450.0, 450.0
    for _ in range(10):
        d = field.gradient(x, y, "danger")
        x, y = x - 5 * d.dx, y - 5 * d.dy
    assert math.hypot(x - 500, y - 500) > math.hypot(450 - 500, 450 - 500) + 40
    assert avoid[0] < 0 and avoid[1] < 0
    x, y = 200.0, 200.0
    for _ in range(10):
        f = field.gradient(x, y, "food")
        x, y = x + 5 * f.dx, y + 5 * f.dy
    assert math.hypot(x - 100, y - 100) < math.hypot(200 - 100, 200 - 100) - 40


def test_guide_6_3_ten_walkers_leave_a_trail_from_origin_to_far_corner() -> None:
    # The guide's slower decay and faster diffusion for trails.
    field = make_field(decay_rate=0.05, diffusion_rate=0.1)
    steps = 0
    for agent in range(10):
        x = y = 0.0
        while True:
            g = field.gradient(x, y, "success_trail", radius=20)
            dx, dy = (g.dx, g.dy) if not g.flat else (0.0, 0.0)
            # The guide: move toward the target, following existing trails.
            nx, ny = x + dx * 10 + 10, y + dy * 10 + 10
            if not (nx < 1000 and ny < 1000):
                break
            x, y = nx, ny
            deposit(field, x, y, "success_trail", agent=f"agent-{agent}")
            steps += 1
            if steps % 25 == 0:
                field.tick()
    view = field.sense("success_trail", columns=50, rows=50, aggregation=Aggregation.MEAN)
    cells = view.values.astype(np.float64)
    i, j = np.indices(cells.shape)
    on_path = cells[i == j].mean()
    elsewhere = cells[np.abs(i - j) > 3].mean()
    assert on_path > 0
    assert on_path > 100 * max(elsewhere, 1e-12), (on_path, elsewhere)
    # The whole way: every block along the diagonal carries the trail.
    assert (cells[i == j] > 0).all()


# --- the tick -------------------------------------------------------------------------------


def test_diffusion_conserves_mass_with_the_zero_flux_boundary() -> None:
    field = make_field(decay_rate=0.0, diffusion_rate=0.25, min_intensity=0.0, width=64, height=48)
    rng = np.random.default_rng(7)
    field.layers["food"] = rng.random((48, 64)).astype(np.float32)
    field.active["food"] = True
    # Heavy mass in every corner and along the edges, where a leaky rule would lose it.
    for x, y in ((0, 0), (63, 0), (0, 47), (63, 47), (30, 0), (0, 20)):
        deposit(field, x, y, amount=50.0)
    before = field.layers["food"].sum(dtype=np.float64)
    field.tick(200)
    after = field.layers["food"].sum(dtype=np.float64)
    assert after == pytest.approx(before, rel=1e-5)
    # ...and it really moved: the corners spread out.
    assert field.read(0, 0, "food") < 10


def test_decay_removes_exactly_its_share_per_tick() -> None:
    field = make_field(decay_rate=0.1, diffusion_rate=0.05, min_intensity=0.0)
    for x, y in ((10, 10), (500, 500), (999, 999)):
        deposit(field, x, y, amount=10.0)
    before = field.layers["food"].sum(dtype=np.float64)
    field.tick(5)
    assert field.layers["food"].sum(dtype=np.float64) == pytest.approx(before * 0.9**5, rel=1e-5)


def test_one_tick_matches_the_formula_cell_by_cell() -> None:
    rng = np.random.default_rng(3)
    src = rng.random((5, 7)).astype(np.float32)
    dst = np.empty_like(src)
    diffuse_and_decay(src, dst, np.empty_like(src), 0.2, 0.4)
    padded = np.pad(src.astype(np.float64), 1, mode="edge")  # zero flux: outside = the edge cell
    mean4 = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
    expected = (1 - 0.2) * ((1 - 0.4) * src + 0.4 * mean4)
    assert np.allclose(dst, expected, rtol=1e-6)


def test_an_isolated_deposit_decays_to_nothing() -> None:
    field = make_field(decay_rate=0.1, diffusion_rate=0.05)
    deposit(field, 300, 700, amount=5.0)
    assert field.active["food"]
    for _ in range(200):
        field.tick()
        if not field.active["food"]:
            break
    assert not field.layers["food"].any()
    assert field.read(300, 700, "food") == 0.0
    assert not field.active["food"]
    ticks = field.ticks
    field.tick()  # an empty layer is no longer ticked
    assert field.ticks == ticks + 1 and field.job is None


def test_deposits_made_while_a_tick_computes_are_kept_and_visible() -> None:
    field = make_field(decay_rate=0.5, diffusion_rate=0.0, min_intensity=0.0)
    deposit(field, 10, 10, amount=4.0)
    job = field.begin_tick()
    assert job is not None
    deposit(field, 10, 10, amount=1.0)
    deposit(field, 20, 20, amount=3.0)
    # Readers see the arrays being read plus what arrived meanwhile.
    assert field.read(10, 10, "food") == pytest.approx(5.0)
    assert field.find_nearest(20, 25, "food", radius=10).found
    job.run()
    field.finish_tick(job)
    # The tick halved the 4.0 it started from; the deposits made during it stay whole.
    assert field.read(10, 10, "food") == pytest.approx(3.0)
    assert field.read(20, 20, "food") == pytest.approx(3.0)


# --- sensing -------------------------------------------------------------------------------


def test_gradient_at_radius_one_is_central_differences() -> None:
    field = make_field(width=50, height=40)
    slope = np.arange(50, dtype=np.float32) * 0.5  # g = 0.5 x
    field.layers["food"] = np.tile(slope, (40, 1)).copy()
    field.active["food"] = True
    g = field.gradient(20.3, 17.9, "food", radius=1)
    assert (g.dx, g.dy) == pytest.approx((1.0, 0.0))
    assert g.magnitude == pytest.approx(0.5)
    g = field.gradient(20, 17, "food", radius=6)
    assert (g.dx, g.dy, g.magnitude) == pytest.approx((1.0, 0.0, 0.5))


def test_flat_fields_give_zero_everywhere_even_at_the_edges() -> None:
    field = make_field(width=30, height=30)
    assert field.gradient(0, 0, "food").flat  # no layer at all
    field.layers["food"] = np.full((30, 30), 2.5, dtype=np.float32)
    field.active["food"] = True
    for x, y in ((0, 0), (29.5, 0), (15, 15), (0, 29), (29, 29)):
        for radius in (1, 5, 20):
            g = field.gradient(x, y, "food", radius=radius)
            assert g.flat and (g.dx, g.dy) == (0.0, 0.0), (x, y, radius)


def test_find_nearest_and_sense() -> None:
    field = make_field()
    deposit(field, 105, 100, amount=2.0)
    deposit(field, 95, 100, amount=9.0)
    deposit(field, 100, 130, amount=50.0)
    near = field.find_nearest(100.5, 100.5, "food", radius=20)
    # Equally close: the stronger one.
    assert (near.found, near.x, near.y, near.intensity) == (True, 95, 100, 9.0)
    assert near.distance == pytest.approx(5.0)
    strong = field.find_nearest(100.5, 100.5, "food", radius=40, min_intensity=10)
    assert (strong.x, strong.y) == (100, 130)
    assert not field.find_nearest(500, 500, "food", radius=50).found

    view = field.sense("food", x_min=90, y_min=90, x_max=110, y_max=140, columns=2, rows=5)
    assert view.values.shape == (5, 2)
    assert view.total == pytest.approx(61.0) and view.maximum == pytest.approx(50.0)
    summed = field.sense(
        "food",
        x_min=90,
        y_min=90,
        x_max=110,
        y_max=140,
        columns=2,
        rows=5,
        aggregation=Aggregation.SUM,
    )
    assert summed.values.sum() == pytest.approx(61.0)
    assert summed.values[1].tolist() == pytest.approx([9.0, 2.0])  # row 1: y 100..109
    peak = field.sense("food", columns=4, rows=4, aggregation=Aggregation.MAX)
    assert peak.values.max() == pytest.approx(50.0)
    whole = field.sense("food", columns=10, rows=10)
    assert whole.values.mean() * 1000 * 1000 == pytest.approx(61.0, rel=1e-4)


# --- limits, replays and bad input --------------------------------------------------------------


def test_intensity_is_capped() -> None:
    field = make_field(max_intensity=10.0)
    assert not deposit(field, 1, 1, amount=6.0).capped
    result = deposit(field, 1, 1, amount=6.0)
    assert result.capped and result.intensity == 10.0
    assert field.read(1, 1, "food") == 10.0


def test_deposits_are_rate_limited_per_agent() -> None:
    clock = FakeClock()
    field = PheromoneField(
        FieldSettings(deposit_rate=2.0, deposit_burst=3.0), clock=clock, wall_clock=lambda: WALL
    )
    for _ in range(3):
        deposit(field, 5, 5, agent="greedy")
    with pytest.raises(ResourceExhausted) as info:
        deposit(field, 5, 5, agent="greedy")
    assert info.value.reason == "DEPOSIT_RATE_LIMITED"
    assert float(info.value.metadata["retry_after_s"]) == pytest.approx(0.5)
    deposit(field, 5, 5, agent="someone-else")  # buckets are per agent
    clock.now += 0.5
    deposit(field, 5, 5, agent="greedy")
    assert field.read(5, 5, "food") == pytest.approx(5.0)


def test_a_retried_or_replayed_deposit_counts_once() -> None:
    field = make_field()
    args = ("scout", 7, 7, "food", 2.0)
    first = field.deposit(*args, issue_ns=int(WALL * 1e9), replay_key=b"req-1")
    again = field.deposit(*args, issue_ns=int(WALL * 1e9), replay_key=b"req-1")
    assert not first.duplicate and again.duplicate
    assert field.read(7, 7, "food") == pytest.approx(2.0)
    with pytest.raises(InvalidArgument) as info:
        field.deposit(*args, issue_ns=int((WALL - 3600) * 1e9), replay_key=b"req-2")
    assert info.value.field == "issue_time" and info.value.reason == "CLOCK_SKEW"


@pytest.mark.parametrize(
    ("x", "y", "kind", "amount", "field_name", "reason"),
    [
        (1000, 5, "food", 1.0, "x", "OUTSIDE_GRID"),
        (-0.5, 5, "food", 1.0, "x", "OUTSIDE_GRID"),
        (5, 1000.0, "food", 1.0, "y", "OUTSIDE_GRID"),
        (float("nan"), 5, "food", 1.0, "x", "NOT_FINITE"),
        (5, float("inf"), "food", 1.0, "y", "NOT_FINITE"),
        (5, 5, "food", -1.0, "amount", "OUT_OF_RANGE"),
        (5, 5, "food", float("nan"), "amount", "NOT_FINITE"),
        (5, 5, "food", float("inf"), "amount", "NOT_FINITE"),
        (5, 5, "food", 1e9, "amount", "OUT_OF_RANGE"),
        (5, 5, "Not A Type", 1.0, "pheromone_type", "MALFORMED_PHEROMONE_TYPE"),
        (5, 5, "", 1.0, "pheromone_type", "EMPTY_FIELD"),
    ],
)
def test_bad_deposits_name_the_field(x, y, kind, amount, field_name, reason) -> None:  # type: ignore[no-untyped-def]
    field = make_field()
    with pytest.raises(InvalidArgument) as info:
        deposit(field, x, y, kind, amount)
    assert (info.value.field, info.value.reason) == (field_name, reason)
    assert not field.layers  # nothing was created or changed


def test_declared_types_refuse_others_and_open_fields_are_bounded() -> None:
    declared = make_field(types=("food", "danger"))
    deposit(declared, 1, 1, "danger")
    for call in (
        lambda: deposit(declared, 1, 1, "success_trail"),
        lambda: declared.read(1, 1, "success_trail"),
        lambda: declared.gradient(1, 1, "success_trail"),
        lambda: declared.sense("success_trail"),
    ):
        with pytest.raises(InvalidArgument) as info:
            call()
        assert (info.value.field, info.value.reason) == ("pheromone_type", "UNKNOWN_PHEROMONE_TYPE")
    open_field = make_field(max_types=2)
    deposit(open_field, 1, 1, "a")
    deposit(open_field, 1, 1, "b")
    assert open_field.read(1, 1, "never-deposited") == 0.0
    with pytest.raises(ResourceExhausted) as limit:
        deposit(open_field, 1, 1, "c")
    assert limit.value.reason == "TOO_MANY_PHEROMONE_TYPES"


def test_bad_sensing_requests_name_the_field() -> None:
    field = make_field(max_sense_radius=100, default_sense_radius=50, max_sense_cells=1000)
    cases = [
        (lambda: field.gradient(5, 5, "food", radius=101), "radius"),
        (lambda: field.gradient(5, 5, "food", radius=-1), "radius"),
        (lambda: field.find_nearest(5, 5, "food", min_intensity=float("nan")), "min_intensity"),
        (lambda: field.sense("food", x_min=10, x_max=5, y_max=10), "x_max"),
        (lambda: field.sense("food", x_min=0, y_min=0, x_max=2000, y_max=10), "x_max"),
        (lambda: field.sense("food", columns=-1), "columns"),
        (lambda: field.sense("food", columns=100, rows=100), "columns"),
    ]
    for call, name in cases:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.field == name


def test_token_bucket_and_replay_guard_forget_what_they_should() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, 1.0, clock=clock, max_keys=2)
    assert bucket.take("a") == 0 and bucket.take("a") == pytest.approx(1.0)
    clock.now += 10
    for key in ("b", "c", "d"):
        bucket.take(key)
    assert len(bucket._buckets) <= 3  # refilled buckets were pruned
    guard = ReplayGuard(5.0, 2, clock=clock)
    guard.remember(b"1")
    guard.remember(b"2")
    guard.remember(b"3")
    assert not guard.seen(b"1") and guard.seen(b"3")  # capacity
    clock.now += 6
    assert not guard.seen(b"3")  # expiry


def test_snapshot_round_trip_with_missed_decay(tmp_path) -> None:  # type: ignore[no-untyped-def]
    field = make_field(decay_rate=0.5, min_intensity=0.0)
    deposit(field, 3, 4, "food", 8.0)
    deposit(field, 9, 9, "danger", 2.0)
    path = str(tmp_path / "field.npz")
    save_snapshot(path, field.export(), field.snapshot_meta())
    loaded = load_snapshot(path)
    assert loaded is not None
    restored = make_field(decay_rate=0.5, min_intensity=0.0, types=("food",))
    skipped = restored.restore(*loaded, decay_ticks=2)
    assert skipped == ["danger"]  # not a declared type here
    assert restored.read(3, 4, "food") == pytest.approx(2.0)
    assert load_snapshot(str(tmp_path / "missing.npz")) is None
    # Garbage in a snapshot never becomes a negative, infinite or NaN intensity.
    layers, meta = loaded
    layers["food"] = layers["food"].copy()
    layers["food"][0, :3] = [np.nan, -5.0, np.inf]
    sane = make_field(max_intensity=100.0)
    sane.restore(layers, meta)
    assert [sane.read(x, 0, "food") for x in range(3)] == [0.0, 0.0, 100.0]


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"STIGMERGY_WIDTH": "0"}, "STIGMERGY_WIDTH"),
        ({"STIGMERGY_WIDTH": "20000", "STIGMERGY_HEIGHT": "20000"}, "STIGMERGY_WIDTH"),
        ({"STIGMERGY_TYPES": "food,Bad Type"}, "STIGMERGY_TYPES"),
        ({"STIGMERGY_DECAY_RATE": "1.5"}, "STIGMERGY_DECAY_RATE"),
        ({"STIGMERGY_DIFFUSION_RATE": "nan"}, "STIGMERGY_DIFFUSION_RATE"),
        ({"STIGMERGY_SENSE_RADIUS": "600"}, "STIGMERGY_SENSE_RADIUS"),
        ({"STIGMERGY_TICK_INTERVAL_S": "-1"}, "STIGMERGY_TICK_INTERVAL_S"),
        ({"REGISTRY_ADDR": "nowhere"}, "REGISTRY_ADDR"),
    ],
)
def test_bad_configuration_names_the_variable(env, variable) -> None:  # type: ignore[no-untyped-def]
    from services.common.config import ConfigError
    from services.stigmergy.config import StigmergyConfig

    with pytest.raises(ConfigError, match=variable):
        StigmergyConfig.from_env(env)
    config = StigmergyConfig.from_env({"STIGMERGY_TYPES": "food, danger,food"})
    assert config.settings.types == ("food", "danger")
