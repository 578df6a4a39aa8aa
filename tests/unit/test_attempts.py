"""The retry policy, the launch watch and the reachability probe, without Spark."""

from __future__ import annotations

import socket

import pytest

from spark_ddl.driver.attempts import SLOT_GRACE_SECONDS, AttemptPolicy, LaunchError, LaunchWatch
from spark_ddl.driver.reachability import LostMachine, answers, lost_machines, ranks_to_probe, unreachable_error
from spark_ddl.errors import TrainingError


def _error(retriable: bool) -> TrainingError:
    return TrainingError("boom", rank=1, remote_type="X", remote_message="boom", retriable=retriable)


def test_failures_count_against_max_retries_and_only_retriable_ones_rerun():
    policy = AttemptPolicy(max_retries=2, epochs=3)
    assert policy.rerun_after_failure(_error(True)) and policy.rerun_after_failure(_error(True))
    assert not policy.rerun_after_failure(_error(True))  # the third failure is one too many
    assert not AttemptPolicy(max_retries=5, epochs=3).rerun_after_failure(_error(False))


def test_an_unreachable_driver_reruns_once_and_pauses_are_bounded_by_the_epochs():
    policy = AttemptPolicy(max_retries=0, epochs=2)
    assert policy.rerun_after_driver_unreachable() and not policy.rerun_after_driver_unreachable()
    assert policy.failures == 0  # not counted as a failure
    policy.rerun_after_pause()
    policy.rerun_after_pause()
    with pytest.raises(RuntimeError, match="no progress"):
        policy.rerun_after_pause()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_short_of_slots_is_given_up_after_the_grace_and_recovering_slots_reset_it():
    clock, slots = Clock(), {"n": 1}
    watch = LaunchWatch(agents=2, timeout=300, slots=lambda: slots["n"], clock=clock)
    assert watch.problem([1], None) is None  # short since now
    clock.now = SLOT_GRACE_SECONDS - 1
    assert watch.problem([1], None) is None
    slots["n"] = 2  # an executor registered: the wait starts over
    assert watch.problem([1], None) is None
    slots["n"] = 1
    clock.now += 1
    assert watch.problem([1], None) is None
    clock.now += SLOT_GRACE_SECONDS
    problem = watch.problem([1], None)
    assert isinstance(problem, LaunchError) and problem.retriable and problem.rank == 1
    assert "needs 2 task slots" in str(problem) and "has had 1" in str(problem) and "min_workers" in str(problem)
    assert watch.problem([], None) is None  # everyone started: nothing to say


def test_ranks_that_never_start_within_the_timeout_are_named_with_their_placement():
    clock = Clock()
    watch = LaunchWatch(agents=3, timeout=60, slots=lambda: None, clock=clock)  # slots unknown (Connect)
    clock.now = 59.9
    assert watch.problem([2], ["10.0.0.1:5", "10.0.0.1:5", "10.0.0.2:7"]) is None
    clock.now = 60.0
    problem = watch.problem([2], ["10.0.0.1:5", "10.0.0.1:5", "10.0.0.2:7"])
    assert isinstance(problem, LaunchError) and problem.retriable
    assert "Rank(s) [2] did not start within timeout=60 s (placed on rank 2: 10.0.0.2:7)" in str(problem)


def test_a_listening_or_refusing_host_answers_and_a_silent_one_does_not():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        address = "127.0.0.1:%d" % server.getsockname()[1]
        assert answers(address, timeout=2)
        server.accept()[0].close()  # empty the accept queue again
        # the accept queue is full now: the kernel drops further SYNs silently, as a cut link does
        held = socket.create_connection(server.getsockname(), timeout=2)
        try:
            assert not answers(address, timeout=1.0)
        finally:
            held.close()
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        assert answers("127.0.0.1:%d" % closed.getsockname()[1], timeout=2)


def test_lost_machines_group_silent_ranks_by_executor_and_probe_each_once():
    probed = []

    def probe(address: str) -> bool:
        probed.append(address)
        return address.startswith("10.0.0.1:")

    placement = ["10.0.0.1:5", "10.0.0.2:7", "10.0.0.1:5", "10.0.0.2:7"]
    lost = lost_machines(placement, [1, 2, 3], probe=probe)
    assert sorted(probed) == ["10.0.0.1:5", "10.0.0.2:7"]
    assert lost == [LostMachine("10.0.0.1:5", (2,), silent=False), LostMachine("10.0.0.2:7", (1, 3), silent=True)]
    assert lost_machines(None, [1], probe=probe) == [] and lost_machines(placement, [], probe=probe) == []
    probed.clear()  # a port known to listen on the host (the block manager) is probed instead of the placement's
    lost = lost_machines(placement, [1], probe=probe, listening={"10.0.0.2": "10.0.0.1:9"})
    assert probed == ["10.0.0.1:9"] and lost == [LostMachine("10.0.0.2:7", (1,), silent=False)]


def test_the_unreachable_error_names_the_machine_and_what_to_set():
    lost = [LostMachine("10.0.0.2:7", (1, 3), silent=True)]
    error = unreachable_error(lost, _error(True), "120s", elastic=False)
    text = str(error)
    assert "10.0.0.2 (ranks 1, 3: no answer from the network)" in text
    assert "spark.network.timeout (120s)" in text and "set min_workers" in text
    assert not error.retriable and error.machines == lost and error.rank == 1
    crashed = unreachable_error([LostMachine("10.0.0.2:7", (1,), silent=False)], _error(True), "120s", elastic=True)
    assert "answers, but its executor is gone" in str(crashed) and "spark.network.timeout" not in str(crashed)
    assert "fewer slots than min_workers" in str(crashed)



def test_a_rank_spark_reported_lost_is_probed_even_before_its_status_connection_closed():
    """Seen in the suite: a crashed machine's executor was reported lost before the driver saw
    its agent's connection end, so no rank was silent and the retry waited for slots instead of
    naming the machine."""
    lost = TrainingError("lost", rank=3, remote_type="AgentLost", remote_message="ExecutorLostFailure",
                         retriable=True)
    assert ranks_to_probe([], lost) == [3]
    assert ranks_to_probe([1, 3], lost) == [1, 3]
    assert ranks_to_probe([2], _error(True)) == [2]  # the agents' own error: only silence counts
    assert ranks_to_probe([], TrainingError("lost", rank=None, remote_type="AgentLost", remote_message="",
                                            retriable=True)) == []
