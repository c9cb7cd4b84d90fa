"""CUDA hygiene on CPU (docs/precision.md §6): device guards, synchronisation, out-of-memory retries,
the engine's current device, Triton GPU instance groups and host storage of source caches. CUDA
itself is mocked where it is only called; the one test that needs a GPU skips without one."""

import threading
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from gnr_fast import devices
from gnr_fast.config import FeatureSite
from gnr_fast.devices import on_device, retry_on_oom, synchronize
from gnr_fast.errors import DeviceOutOfMemoryError, InputError
from gnr_fast.fast.source_cache import CacheKey, SourceCache
from gnr_fast.serving.triton_repo import RepoConfig, instance_device, model_config


class _Recorder:
    """Stands in for ``torch.cuda.device``: records the device and the thread that entered it."""

    entered: ClassVar[list] = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _Recorder.entered.append((torch.device(self.device), threading.current_thread().name))

    def __exit__(self, *exc):
        return False


@pytest.fixture
def cuda_device_calls(monkeypatch):
    _Recorder.entered = []
    monkeypatch.setattr(torch.cuda, "device", _Recorder)
    return _Recorder.entered


def test_on_device_guards_cuda_devices_only(cuda_device_calls):
    with on_device(torch.device("cuda:1")):
        pass
    with on_device("cpu"):
        pass
    assert cuda_device_calls == [(torch.device("cuda:1"), threading.current_thread().name)]


def test_synchronize_waits_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize("cpu")
    synchronize(torch.device("cuda:1"))
    assert calls == [torch.device("cuda:1")]


def test_service_runs_on_the_editors_device_on_every_thread(cuda_device_calls):
    from gnr_fast.serving.service import EditService

    editor = SimpleNamespace(components=SimpleNamespace(device=torch.device("cuda:1")), default_steps=None)
    service = EditService(editor)
    thread = threading.Thread(target=service.run, args=([],), name="gnr-engine-test")
    thread.start()
    thread.join()
    assert cuda_device_calls == [(torch.device("cuda:1"), "gnr-engine-test")]


def _oom_over(limit: int, always: set = frozenset()):
    """A batch runner that runs out of memory above ``limit`` items or on any item in ``always``."""
    calls = []

    def run(items):
        calls.append(list(items))
        if len(items) > limit or any(i in always for i in items):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"edited {i}" for i in items]

    return run, calls


def test_oom_in_a_batch_drops_caches_and_retries_singly(monkeypatch):
    released, dropped = [], []
    monkeypatch.setattr(devices, "release_memory", lambda device: released.append(device))
    run, calls = _oom_over(1)
    results = retry_on_oom(run, [1, 2, 3], "cuda:0", drop_caches=lambda: dropped.append(True))
    assert results == ["edited 1", "edited 2", "edited 3"]
    assert calls == [[1, 2, 3], [1], [2], [3]]
    assert dropped == [True] and released == ["cuda:0"]


def test_an_item_that_does_not_fit_alone_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(devices, "release_memory", lambda device: None)
    run, _ = _oom_over(1, always={2})
    results = retry_on_oom(run, [1, 2, 3], "cuda:0", describe=lambda i: f"edit #{i}")
    assert results[0] == "edited 1" and results[2] == "edited 3"
    error = results[1]
    assert isinstance(error, DeviceOutOfMemoryError)
    assert "edit #2 does not fit in the memory of cuda:0 even alone" in str(error)
    assert "max_pixels" in str(error) and isinstance(error.__cause__, torch.OutOfMemoryError)


def test_no_oom_runs_the_batch_once_and_other_errors_pass_through():
    run, calls = _oom_over(10)
    assert retry_on_oom(run, [1, 2], "cpu") == ["edited 1", "edited 2"] and calls == [[1, 2]]

    def bad(items):
        raise InputError("bad prompt")

    with pytest.raises(InputError):
        retry_on_oom(bad, [1], "cpu")


def test_release_memory_empties_the_cuda_allocator(monkeypatch, cuda_device_calls):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    devices.release_memory("cpu")
    assert emptied == []
    devices.release_memory("cuda:1")
    assert emptied == [True] and cuda_device_calls[0][0] == torch.device("cuda:1")


def test_triton_repo_uses_gpu_instance_groups_on_cuda():
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in model_config(RepoConfig(instances=2))
    assert "instance_group [ { count: 2 kind: KIND_GPU gpus: [ 1 ] } ]" in model_config(RepoConfig(device="cuda:1", instances=2))
    assert "instance_group [ { count: 1 kind: KIND_GPU } ]" in model_config(RepoConfig(device="cuda"))
    gpu_instance = {"model_instance_kind": "GPU", "model_instance_device_id": "3"}
    assert instance_device("cuda", gpu_instance) == "cuda:3"
    assert instance_device("cpu", {"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cpu"
    with pytest.raises(Exception, match="device must be"):
        RepoConfig(device="gpu0")


def _capture(device="cpu"):
    from gnr_fast.attention import CaptureMode, PassCapture

    cap = PassCapture(layers=frozenset({0}), mode=CaptureMode.QK, feature_sites=frozenset({FeatureSite.UP_LAST}), with_lse=True)
    cap.queries[0] = torch.randn(1, 2, 16, 4, device=device)
    cap.keys[0] = torch.randn(1, 2, 16, 4, device=device)
    cap.lse[0] = torch.randn(1, 2, 16, device=device)
    cap.scales[0] = 0.5
    cap.features[FeatureSite.UP_LAST] = torch.randn(1, 3, 4, 4, device=device)
    return cap


KEY = CacheKey("reference", frozenset({0}), frozenset({FeatureSite.UP_LAST}), 10)


def test_source_cache_keeps_cuda_captures_in_host_memory_by_default():
    assert SourceCache(KEY, device=torch.device("cuda:0")).stores_on_host
    assert not SourceCache(KEY, device=torch.device("cuda:0"), host_storage=False).stores_on_host
    assert not SourceCache(KEY, device=torch.device("cpu"), host_storage=True).stores_on_host
    cache = SourceCache(KEY)
    cap = _capture()
    assert cache.put(3, cap) and cache.device == torch.device("cpu") and not cache.stores_on_host
    got = cache.get(3, torch.float32)
    assert torch.equal(got.queries[0], cap.queries[0]) and got.queries[0].data_ptr() != cap.queries[0].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_source_cache_round_trips_through_pinned_memory_on_cuda():
    cache = SourceCache(KEY, storage_dtype=torch.float16)
    cap = _capture("cuda")
    cache.put(0, cap)
    stored = cache.steps[0]
    assert stored.queries[0].device.type == "cpu" and stored.queries[0].is_pinned()
    got = cache.get(0, torch.float32)
    assert got.queries[0].device == cap.queries[0].device and got.lse[0].dtype == torch.float32
    torch.testing.assert_close(got.queries[0], cap.queries[0], rtol=1e-3, atol=1e-3)


class _FakeKernel:
    """Stands in for a ``@triton.jit`` kernel: records, at each launch, the devices entered around it."""

    def __init__(self, name: str, launches: list, guards: list) -> None:
        self.name, self.launches, self.guards = name, launches, guards

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, list(self.guards)))

        return launch


@pytest.fixture
def spied_triton_launches(monkeypatch):
    """The Triton ops' kernels replaced by :class:`_FakeKernel` and their ``on_device`` by a spy that
    records the device it guards (``on_device`` itself: test_on_device_guards_cuda_devices_only)."""
    import contextlib
    import importlib

    # the modules (the package re-exports functions of these names)
    attention_lse = importlib.import_module("gnr_fast.ops.attention_lse")
    attn_map_energy = importlib.import_module("gnr_fast.ops.attn_map_energy.triton_path")
    feature_energy = importlib.import_module("gnr_fast.ops.feature_energy")
    rescale_norms = importlib.import_module("gnr_fast.ops.rescale_norms")
    launches, guards = [], []

    @contextlib.contextmanager
    def spy(device):
        guards.append(torch.device(device))
        try:
            yield
        finally:
            guards.pop()

    names = ("_attn_map_energy_fwd_kernel", "_attn_map_energy_bwd_dq_kernel", "_attn_map_energy_bwd_dk_kernel",
             "_attention_lse_fwd_kernel", "_feature_energy_kernel", "_rescale_gamma_kernel")
    kernels = SimpleNamespace(**{name: _FakeKernel(name, launches, guards) for name in names})
    for module in (attention_lse, attn_map_energy, feature_energy, rescale_norms):
        monkeypatch.setattr(module, "on_device", spy)
    monkeypatch.setattr(attn_map_energy, "_kernel_module", lambda: kernels)
    for module in (attention_lse, feature_energy, rescale_norms):
        monkeypatch.setattr(module, "kernel_module", lambda name: kernels)
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    return launches


def test_triton_kernels_launch_under_the_tensors_device(spied_triton_launches):
    """Triton launches on the thread's current CUDA device, not the tensors': every launch of the
    attention-map energy (forward, dq, dk), attention-lse, feature-energy and rescale ops runs inside
    ``on_device`` of its tensors' device."""
    q, k, q_ref, k_ref = (torch.randn(1, 2, 16, 8) for _ in range(4))
    lse_ref = torch.randn(1, 2, 16)
    row = torch.randn(1, 2, 16)
    torch.ops.gnr_fast.attn_map_energy_fwd(q, k, q_ref, k_ref, lse_ref, 0.35)
    torch.ops.gnr_fast.attn_map_energy_bwd(q, k, q_ref, k_ref, lse_ref, row, row, row, 0.35)
    torch.ops.gnr_fast.attention_lse_fwd(q, k, k, 0.35)
    torch.ops.gnr_fast.feature_energy_fwd(q, k_ref, True)
    torch.ops.gnr_fast.rescale_gamma(q, k, 0.3, 3.0)
    assert [name for name, _ in spied_triton_launches] == [
        "_attn_map_energy_fwd_kernel", "_attn_map_energy_bwd_dq_kernel", "_attn_map_energy_bwd_dk_kernel",
        "_attention_lse_fwd_kernel", "_feature_energy_kernel", "_rescale_gamma_kernel",
    ]
    assert all(guards == [q.device] for _, guards in spied_triton_launches)


def test_source_cache_pins_its_host_copies_of_cuda_captures(monkeypatch):
    """A CUDA capture is copied into pinned host memory, asynchronously (mocked: no CUDA here; the
    round trip through real pinned memory is the GPU test below)."""

    class CudaLooking(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    requests = []
    empty = torch.empty

    def recording_empty(*args, pin_memory=False, **kwargs):
        requests.append(pin_memory)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    cache = SourceCache(KEY, storage_dtype=torch.float16, device=torch.device("cuda:0"))
    cap = _capture()
    for group in (cap.queries, cap.keys, cap.lse):
        group[0] = group[0].as_subclass(CudaLooking)
    cap.features = {site: t.as_subclass(CudaLooking) for site, t in cap.features.items()}
    assert cache.put(0, cap)
    assert requests == [True] * 4  # q, k, lse, features: each into pinned memory
    stored = cache.steps[0]
    assert stored.queries[0].dtype == torch.float16 and stored.lse[0].dtype == torch.float32
    assert torch.equal(stored.lse[0].as_subclass(torch.Tensor), cap.lse[0].as_subclass(torch.Tensor))
