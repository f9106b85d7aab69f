"""Boids without sockets: the guide's 5.3 emergence, the steering limits, the
torus, the KD-tree against brute force, and the service's caps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.swarm.flock import (
    Flock,
    FlockRules,
    Flocks,
    FlockSettings,
    World,
    order_parameter,
)


def test_guide_5_3_a_hundred_boids_align_within_a_hundred_steps() -> None:
    # The guide's rules and start (speeds up to 4, headings at random). At the
    # guide's own density (100 boids in 1000 x 1000: under one neighbour within
    # 50) boids rarely meet in 100 steps, so the world here is 250 x 250, where
    # they do.
    starts, ends = [], []
    for seed in range(8):
        flock = Flock.random(100, FlockRules(), World(250, 250), seed)
        starts.append(flock.order())
        orders = flock.step(100)
        ends.append(orders[-1])
        assert flock.steps == 100 and len(orders) == 100
    assert np.mean(starts) < 0.2  # random headings: about 1/sqrt(100)
    assert np.mean(ends) > 0.6
    assert np.mean(ends) > 4 * np.mean(starts)
    assert all(end > start for start, end in zip(starts, ends, strict=True))


def test_order_parameter() -> None:
    assert order_parameter(np.array([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(1.0)
    assert order_parameter(np.array([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(0.0)
    assert order_parameter(np.array([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(0.5)
    assert order_parameter(np.zeros((0, 2))) == 0.0


def test_speed_and_steering_stay_within_their_caps() -> None:
    rules = FlockRules(max_speed=3.0, max_force=0.2)
    flock = Flock.random(400, rules, World(300, 300), 5)
    weights = rules.separation_weight + rules.alignment_weight + rules.cohesion_weight
    for _ in range(30):
        before = flock.velocities.copy()
        flock.step()
        speed = np.hypot(flock.velocities[:, 0], flock.velocities[:, 1])
        assert speed.max() <= 3.0 + 1e-9
        # Each rule's steering is capped at max_force; the acceleration at their weighted sum.
        change = np.hypot(*(flock.velocities - before).T)
        assert change.max() <= weights * 0.2 + 1e-9
        assert (flock.positions >= 0).all() and (flock.positions < 300).all()


def test_the_world_wraps_around() -> None:
    flock = Flock(
        FlockRules(),
        World(1000, 800),
        positions=np.array([[998.0, 2.0]]),
        velocities=np.array([[4.0, -3.0]]),
    )
    flock.step()
    assert flock.positions[0] == pytest.approx([2.0, 799.0])


def test_neighbours_across_the_wrap_match_brute_force() -> None:
    rng = np.random.default_rng(11)
    world = World(120, 90)
    rules = FlockRules(
        separation_distance=10, alignment_distance=20, cohesion_distance=20, max_neighbors=64
    )
    flock = Flock(rules, world, rng.random((60, 2)) * [120, 90], rng.normal(size=(60, 2)))
    index, ox, oy, distance = flock.neighbours()
    box = np.array([120.0, 90.0])
    for i in range(60):
        d = flock.positions - flock.positions[i]
        d -= box * np.round(d / box)
        dist = np.hypot(d[:, 0], d[:, 1])
        expected = {j for j in range(60) if j != i and dist[j] <= 20}
        found = {int(j) for j, r in zip(index[i], distance[i], strict=True) if np.isfinite(r)}
        assert found == expected, i
        for j, dx, dy, r in zip(index[i], ox[i], oy[i], distance[i], strict=True):
            if np.isfinite(r):
                assert (dx, dy) == pytest.approx(tuple(d[j]))
                assert r == pytest.approx(dist[j])


def test_each_boid_perceives_at_most_max_neighbors() -> None:
    rules = FlockRules(max_neighbors=3)
    rng = np.random.default_rng(2)
    flock = Flock(rules, World(), 500 + rng.random((50, 2)), np.ones((50, 2)))
    index, _, _, distance = flock.neighbours()
    assert index.shape == (50, 4)
    assert (np.isfinite(distance).sum(axis=1) == 3).all()  # self dropped, 3 nearest kept


def test_two_boids_that_meet_steer_together_and_coincident_boids_are_safe() -> None:
    flock = Flock(
        FlockRules(),
        World(),
        positions=np.array([[100.0, 100.0], [120.0, 100.0], [500.0, 500.0], [500.0, 500.0]]),
        velocities=np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),
    )
    before = abs(np.dot(flock.velocities[0], flock.velocities[1]))
    flock.step(20)
    v0, v1 = flock.velocities[0], flock.velocities[1]
    # Perpendicular at first, flying together after 20 steps (and still close).
    assert np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1)) > 0.95
    assert before == 0 and np.linalg.norm(flock.positions[0] - flock.positions[1]) < 50
    assert np.isfinite(flock.positions).all() and np.isfinite(flock.velocities).all()


def test_the_same_seed_gives_the_same_flight_and_state_survives_bytes() -> None:
    a = Flock.random(200, FlockRules(), World(400, 400), 42)
    b = Flock.random(200, FlockRules(), World(400, 400), 42)
    a.step(25)
    b.step(25)
    assert np.array_equal(a.positions, b.positions)
    copy = Flock.from_state(a.rules, a.world, a.size, a.state_bytes(), a.steps)
    assert np.array_equal(copy.positions, a.positions) and copy.steps == 25
    copy.step(5)
    a.step(5)
    assert np.array_equal(copy.velocities, a.velocities)
    with pytest.raises(ValueError):
        Flock.from_state(a.rules, a.world, a.size + 1, a.state_bytes(), 0)


def test_the_service_caps_and_validation_name_the_field() -> None:
    flocks = Flocks(
        FlockSettings(max_boids=1000, max_total_boids=1500, max_flocks=3, max_step_work=10_000)
    )
    record, created = flocks.create(1000, FlockRules(), World(), 1, request_id="r1", now_wall=0)
    again, created_again = flocks.create(
        1000, FlockRules(), World(), 1, request_id="r1", now_wall=0
    )
    assert created and not created_again and again is record

    def refused(call, error=InvalidArgument):  # type: ignore[no-untyped-def]
        with pytest.raises(error) as info:
            call()
        return info.value

    assert (
        refused(lambda: flocks.create(1001, FlockRules(), World(), 1, now_wall=0)).field == "boids"
    )
    assert refused(lambda: flocks.create(0, FlockRules(), World(), 1, now_wall=0)).field == "boids"
    assert (
        refused(
            lambda: flocks.create(501, FlockRules(), World(), 1, now_wall=0), ResourceExhausted
        ).reason
        == "TOO_MANY_BOIDS_IN_SERVICE"
    )
    assert refused(lambda: flocks.create(5, FlockRules(), World(), -1, now_wall=0)).field == "seed"
    assert (
        refused(lambda: flocks.create(5, FlockRules(), World(-1, 5), 1, now_wall=0)).field
        == "world.width"
    )
    assert (
        refused(lambda: flocks.create(5, FlockRules(), World(80, 1000), 1, now_wall=0)).field
        == "rules.alignment_distance"
    )
    assert (
        refused(
            lambda: flocks.create(5, FlockRules(max_speed=math.nan), World(), 1, now_wall=0)
        ).field
        == "rules.max_speed"
    )
    assert (
        refused(
            lambda: flocks.create(5, FlockRules(separation_weight=-1), World(), 1, now_wall=0)
        ).field
        == "rules.separation_weight"
    )
    assert (
        refused(lambda: flocks.create(5, FlockRules(max_neighbors=0), World(), 1, now_wall=0)).field
        == "rules.max_neighbors"
    )
    assert refused(lambda: flocks.check_step(record.flock_id, 0)).field == "steps"
    assert refused(lambda: flocks.check_step(record.flock_id, 11)).reason == "TOO_MANY_STEPS"
    assert flocks.check_step(record.flock_id, 10) is record
    assert refused(lambda: flocks.get("flock-nope"), NotFound).field == "flock_id"
    flocks.create(10, FlockRules(), World(), 1, now_wall=0)
    flocks.create(10, FlockRules(), World(), 1, now_wall=0)
    assert (
        refused(
            lambda: flocks.create(10, FlockRules(), World(), 1, now_wall=0), ResourceExhausted
        ).reason
        == "TOO_MANY_FLOCKS"
    )
    page, token, total = flocks.list(page_size=2)
    rest, last, _ = flocks.list(page_size=2, page_token=token)
    assert total == 3 and len(page) == 2 and len(rest) == 1 and last == ""
    flocks.delete(record.flock_id)
    assert flocks.total_boids == 20
