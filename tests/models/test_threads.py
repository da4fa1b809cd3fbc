"""Thread choice under load: affinity and cgroup quotas read from fake files, bounds, restore."""

import pytest
import torch

from wiremap.attribution.attribute import attribute
from wiremap.errors import WiremapError
from wiremap.models import threads as T


def fake_proc(tmp_path, cgroup: str, running: int = 1, own: str = "R"):
    """A fake /proc: this process's cgroup line, /proc/stat's runnable count, one own task."""
    proc = tmp_path / "proc"
    (proc / "self" / "task" / "1").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "stat").write_text(f"cpu  1 2 3\nprocs_running {running}\nprocs_blocked 0\n")
    (proc / "self" / "task" / "1" / "stat").write_text(f"1 (python (x) y) {own} 0 1 1\n")
    return proc


def fake_cgroup(tmp_path, rel: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    (root / rel).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / rel / name).write_text(text)
    return root


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr(T.os, "cpu_count", lambda: 16)
    for name in (T.ENV, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)


def test_cgroup_v2_quota_caps_the_affinity_mask(tmp_path, eight_cores):
    proc = fake_proc(tmp_path, "0::/job/a\n")
    root = fake_cgroup(tmp_path, "job/a", {"cpu.max": "250000 100000\n"})
    assert T.cgroup_quota(proc, root) == 2.5
    assert T.allowed_cores(proc, root) == 2


def test_cgroup_v2_without_a_quota_leaves_the_mask(tmp_path, eight_cores):
    proc = fake_proc(tmp_path, "0::/job/a\n")
    root = fake_cgroup(tmp_path, "job/a", {"cpu.max": "max 100000\n"})
    assert T.cgroup_quota(proc, root) is None
    assert T.allowed_cores(proc, root) == 8


def test_cgroup_v1_quota_and_unlimited(tmp_path, eight_cores):
    proc = fake_proc(tmp_path, "4:memory:/m\n3:cpu,cpuacct:/job\n")
    root = fake_cgroup(tmp_path, "cpu,cpuacct/job", {"cpu.cfs_period_us": "100000"})
    (root / "cpu,cpuacct/job/cpu.cfs_quota_us").write_text("300000\n")
    assert T.allowed_cores(proc, root) == 3
    (root / "cpu,cpuacct/job/cpu.cfs_quota_us").write_text("-1\n")
    assert T.allowed_cores(proc, root) == 8


def test_a_quota_below_one_core_still_gives_one(tmp_path, eight_cores):
    proc = fake_proc(tmp_path, "0::/\n")
    root = fake_cgroup(tmp_path, "", {"cpu.max": "50000 100000"})
    assert T.allowed_cores(proc, root) == 1


def test_busy_elsewhere_does_not_count_our_own_threads(tmp_path):
    assert T.busy_elsewhere(fake_proc(tmp_path, "0::/\n", running=4), gap=0) == 3
    assert T.busy_elsewhere(fake_proc(tmp_path / "b", "0::/\n", running=1), gap=0) == 0


def test_choice_is_bounded_by_cap_cores_and_idle_cores(tmp_path, eight_cores):
    root = fake_cgroup(tmp_path, "", {"cpu.max": "max 100000"})
    idle = fake_proc(tmp_path / "idle", "0::/\n", running=1)
    assert T.choose_threads(cap=32, proc=idle, cgroup_root=root) == 8  # the mask
    assert T.choose_threads(cap=3, proc=idle, cgroup_root=root) == 3  # the caller's count
    busy = fake_proc(tmp_path / "busy", "0::/\n", running=13)  # 12 others on 16 cores
    assert T.choose_threads(cap=32, proc=busy, cgroup_root=root) == 4
    swamped = fake_proc(tmp_path / "swamped", "0::/\n", running=40)
    assert T.choose_threads(cap=32, proc=swamped, cgroup_root=root) == 1


def test_passive_waits_keep_the_idle_core_limit(tmp_path, monkeypatch, eight_cores):
    # measured: beside busy jobs, sleeping threads on busy cores were slower than one thread
    root = fake_cgroup(tmp_path, "", {"cpu.max": "max 100000"})
    swamped = fake_proc(tmp_path / "swamped", "0::/\n", running=40)
    busy = fake_proc(tmp_path / "busy", "0::/\n", running=14)  # 13 others on 16 cores
    for policy in ("passive", "active"):
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        assert T.choose_threads(cap=32, proc=swamped, cgroup_root=root) == 1
        assert T.choose_threads(cap=32, proc=busy, cgroup_root=root) == 3


def test_env_var_fixes_the_count_and_bad_values_are_clear(tmp_path, monkeypatch, eight_cores):
    monkeypatch.setenv(T.ENV, "5")
    assert T.choose_threads(cap=2) == 5
    monkeypatch.setenv(T.ENV, "zero")
    with pytest.raises(WiremapError, match="WIREMAP_THREADS='zero'"):
        T.choose_threads()


@pytest.fixture
def caller_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def test_attribute_restores_the_callers_thread_count(tiny_model_dir, monkeypatch, caller_threads):
    from test_attribute import PROMPT, make_rm

    rm = make_rm(tiny_model_dir)
    monkeypatch.setenv(T.ENV, "2")
    seen = []
    monkeypatch.setattr(T.ThreadGovernor, "refresh", _recording(T.ThreadGovernor.refresh, seen))
    graph = attribute(PROMPT, rm, verbose=False)
    assert graph.settings["threads"] == 2 and set(seen) == {2}
    assert torch.get_num_threads() == caller_threads
    with pytest.raises(WiremapError):
        attribute(PROMPT, rm, verbose=False, target_batch=0)
    assert torch.get_num_threads() == caller_threads


def _recording(refresh, seen: list):
    def wrapped(self, force=False):
        out = refresh(self, force)
        seen.append(torch.get_num_threads())
        return out

    return wrapped


def test_nested_and_other_threads_contexts_leave_the_callers_count(monkeypatch, caller_threads):
    import threading

    monkeypatch.setenv(T.ENV, "1")
    inside, release = threading.Event(), threading.Event()

    def other():
        with T.threads_for_load():
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=other)
    worker.start()
    inside.wait(10)
    with T.threads_for_load() as gov:
        assert gov.cap == caller_threads and torch.get_num_threads() == 1
        with T.threads_for_load():
            pass
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == caller_threads
    release.set()
    worker.join()
    assert torch.get_num_threads() == caller_threads


def test_governor_chooses_again_only_after_the_refresh_interval(monkeypatch, caller_threads):
    choices = iter([2, 1, 1])
    monkeypatch.setattr(T, "choose_threads", lambda cap: next(choices))
    clock = [100.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: clock[0])
    with T.threads_for_load() as gov:
        assert torch.get_num_threads() == 2
        gov.refresh()  # within the interval: no new choice
        assert torch.get_num_threads() == 2
        clock[0] += T.REFRESH_SECONDS
        assert gov.refresh() == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == caller_threads


def test_busy_elsewhere_takes_the_median_of_its_samples(tmp_path, monkeypatch):
    proc = fake_proc(tmp_path, "0::/\n")
    reads = iter([1, 3, 3, 1, 3])  # two other tasks runnable in 3 of the 5 samples
    monkeypatch.setattr(T, "_procs_running", lambda _proc: next(reads))
    assert T.busy_elsewhere(proc, samples=5, gap=0) == 2
