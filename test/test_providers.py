"""The GPU path's logic on the CPU: provider plan, fallback, the report of what runs, capture, swap exclusion.

No GPU here, so ORT's GPU sessions are played by the stand-ins of gpu_fakes.py. The real-ORT CPU tests
stay in test_runtime.py.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from gpu_fakes import BOTH, Factory, GpuStandIn, Sub, fake_gpu
from onnxruntime.capi.onnxruntime_pybind11_state import Fail
from tiny_models import make_tiny_model

from diffusion_controller.core import providers as pv
from diffusion_controller.core.providers import CPU, CUDA, TRT
from diffusion_controller.core.runtime import ModelError, Policy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_models")
    return {  # ops standard: what TensorRT runs (an ort_fused graph is refused by it, test_fused_graph)
        "fused": make_tiny_model(d, graph="fused", steps=2, ops="standard"),
        "denoiser": make_tiny_model(d, graph="denoiser", steps=2),
    }


def names(c: pv.Candidate) -> list[str]:
    return [e[0] if isinstance(e, tuple) else e for e in c.entries]


def opts(c: pv.Candidate) -> dict[str, dict[str, str]]:
    return {e[0]: e[1] for e in c.entries if isinstance(e, tuple)}


# -- the plan (pure) ----------------------------------------------------------------------------------------


def test_auto_tries_tensorrt_then_cuda_then_cpu_each_with_and_without_capture():
    cands, notes = pv.plan("auto", cuda_graph=True, device_id=1, problems=BOTH)
    assert [(c.provider, c.cuda_graph) for c in cands] == [
        ("tensorrt", True), ("tensorrt", False), ("cuda", True), ("cuda", False), ("cpu", False),
    ]  # fmt: skip
    assert notes == []
    for c in cands[:4]:
        assert all(o["device_id"] == "1" for o in opts(c).values())
    assert cands[-1].entries == (CPU,)


def test_device_0_is_not_named_and_tf32_is_off_unless_asked():
    """ORT 1.26+ looks for a plugin EP device whenever `device_id` is given and warns on every session
    when there is none (see providers._device_option); device 0 is ORT's default, so it is left out.
    TF32 is the CUDA EP's default: off here, so the GPU computes float32 as the CPU does."""
    for c in pv.plan("auto", problems=BOTH)[0][:4]:
        assert all("device_id" not in o for o in opts(c).values())
        assert opts(c)[CUDA]["use_tf32"] == "0"
    for c in pv.plan("cuda", device_id=2, tf32=True, problems=BOTH)[0]:
        assert opts(c)[CUDA]["use_tf32"] == "1" and opts(c)[CUDA]["device_id"] == "2"


def test_capture_is_requested_from_one_gpu_ep_only():
    """Finding 1: with TensorRT registered, ORT needs every node on TensorRT to capture; capture switched
    on for CUDA too made any CUDA node fail the session. TensorRT captures alone; CUDA never beside it."""
    trt_graph, trt_plain, cuda_graph, cuda_plain, _ = pv.plan("auto", problems=BOTH)[0]
    assert names(trt_graph) == [TRT, CUDA, CPU]
    assert opts(trt_graph)[TRT]["trt_cuda_graph_enable"] == "1"
    assert opts(trt_graph)[CUDA]["enable_cuda_graph"] == "0"
    assert opts(trt_plain)[TRT]["trt_cuda_graph_enable"] == "0"
    assert names(cuda_graph) == [CUDA, CPU] and opts(cuda_graph)[CUDA]["enable_cuda_graph"] == "1"
    assert opts(cuda_plain)[CUDA]["enable_cuda_graph"] == "0"
    off, _ = pv.plan("auto", cuda_graph=False, problems=BOTH)
    assert [c.cuda_graph for c in off] == [False, False, False]
    assert all(v != "1" for c in off for o in opts(c).values() for k, v in o.items() if "graph" in k)


def test_fp16_and_engine_cache_are_tensorrt_options(tmp_path):
    """Finding 5: engines and timing cache in a given directory, fp16 as TensorRT's build flag."""
    cands, notes = pv.plan("auto", precision="fp16", engine_cache=tmp_path, problems=BOTH)
    trt = opts(cands[0])[TRT]
    assert trt["trt_fp16_enable"] == "1"
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "1"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path)
    assert [c.precision for c in cands] == ["fp16", "fp16", "fp32", "fp32", "fp32"]
    assert any("fp16 is TensorRT's" in n for n in notes)
    assert "trt_engine_cache_enable" not in opts(pv.plan("tensorrt", problems=BOTH)[0][0])[TRT]
    with pytest.raises(ValueError, match="precision fp16 is TensorRT's"):
        pv.plan("cuda", precision="fp16", problems=BOTH)


def test_explicit_gpu_provider_never_plans_a_cpu_session():
    for provider in ("tensorrt", "cuda"):
        cands, _ = pv.plan(provider, problems=BOTH)
        assert {c.provider for c in cands} == {provider}
    with pytest.raises(ValueError, match="provider 'cuda' requested but it cannot be used here: no driver"):
        pv.plan("cuda", problems={"tensorrt": None, "cuda": "no driver"})
    cands, notes = pv.plan("auto", problems={"tensorrt": "no TensorRT", "cuda": None})
    assert [c.provider for c in cands] == ["cuda", "cuda", "cpu"]
    assert notes == ["policy: tensorrt not used: no TensorRT"]
    assert [c.provider for c in pv.plan("auto", problems={})[0]] == ["cpu"]  # unchecked: not used
    assert pv.plan("cpu", precision="fp32", problems={})[0] == [pv.Candidate("cpu", (CPU,), False)]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"provider": "npu"}, "provider"),
        ({"precision": "int8"}, "precision"),
        ({"device_id": -1}, "device_id"),
    ],
)
def test_plan_rejects_bad_requests(kw, match):
    args = {"provider": "auto"} | kw
    with pytest.raises(ValueError, match=match):
        pv.plan(args.pop("provider"), problems=BOTH, **args)


class Placed:
    def __init__(self, registered, nodes):
        self.registered, self.nodes = registered, nodes

    def get_providers(self):
        return self.registered

    def get_provider_graph_assignment_info(self):
        if self.nodes is None:
            raise Fail("Session configuration entry 'session.record_ep_graph_assignment_info' must be set")
        return [Sub(ep, n) for ep, n in self.nodes]


def test_what_runs_comes_from_node_placement_not_registration():
    """Finding 3: get_providers() is what was registered; the placement says what runs."""
    s = Placed([TRT, CUDA, CPU], [(CUDA, 40), (CPU, 3)])
    nodes = pv.placement(s)
    assert nodes == {"cuda": 40, "cpu": 3}
    assert pv.runs_on(s.get_providers(), nodes) == "cuda"
    assert pv.runs_on([TRT, CUDA, CPU], {"tensorrt": 1, "cuda": 40}) == "tensorrt"
    assert pv.runs_on([CUDA, CPU], {"cpu": 43}) == "cpu"
    unrecorded = Placed([CUDA, CPU], None)
    assert pv.placement(unrecorded) is None and pv.runs_on([CUDA, CPU], None) == "cuda"


def test_engine_cache_path_is_keyed_by_model_content_gpu_and_ort(tmp_path, monkeypatch):
    a, b = tmp_path / "m.onnx", tmp_path / "other" / "m.onnx"
    b.parent.mkdir()
    a.write_bytes(b"model one")
    b.write_bytes(b"model two")
    pa = pv.engine_cache_path(tmp_path / "cache", a, 0, "NVIDIA H200")
    assert pa.parent.parent == tmp_path / "cache" and pa.parent.name.startswith("m-")
    assert pa.name == f"NVIDIA-H200-ort{ort.__version__}"
    assert pv.engine_cache_path(tmp_path / "cache", b, 0, "NVIDIA H200") != pa  # new weights, new engine
    assert pv.engine_cache_path(tmp_path / "cache", a, 0, "NVIDIA H200") == pa  # built once, reused
    assert pv.engine_cache_path(tmp_path / "cache", a, 1).name.startswith("device1-")
    name = pv.gpu_name(0)  # the driver's name where there is a GPU ("NVIDIA H200"), else None
    assert name is None or (isinstance(name, str) and name.strip() == name and name)

    def no_driver(*_a, **_kw):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(pv.ctypes, "CDLL", no_driver)
    assert pv.gpu_name(0) is None  # no driver: no name, and the key falls back to the device number


# -- the load loop with stand-in sessions -------------------------------------------------------------------


@pytest.fixture
def gpu(monkeypatch):
    return fake_gpu(monkeypatch)


def load(path, factory, lines=None, **kw):
    log = lines.append if lines is not None else (lambda _m: None)
    return Policy.load(path, log=log, session_factory=factory, **kw)


def test_tensorrt_failure_falls_back_to_cuda_with_one_log_line(gpu, models, tmp_path):
    """Finding 2: an engine build EP_FAIL (ORT's Fail, not a RuntimeError) used to end the load."""
    f = Factory(refuse={("tensorrt", True): "[ONNXRuntimeError] : 11 : EP_FAIL : TensorRT engine build"})
    lines: list[str] = []
    p = load(models["fused"], f, lines, engine_cache_dir=str(tmp_path / "engines"))
    assert [(c[0], c[1]) for c in f.calls] == [("tensorrt", True), ("cuda", True)]  # no 2nd TRT build
    assert (p.provider, p.cuda_graph, p.precision, p.device_id) == ("cuda", True, "fp32", 0)
    assert any("tensorrt (fp32, CUDA graph) did not start" in line and "EP_FAIL" in line for line in lines)
    assert "cuda, CUDA graph, TF32 off, GPU 0" in lines[-1] and "40 nodes on cuda" in lines[-1]


def test_tf32_is_chosen_at_load_and_said_in_the_log_line(gpu, models):
    f = Factory()
    lines: list[str] = []
    p = load(models["fused"], f, lines, provider="cuda", tf32=True)
    assert f.calls[0][2][0][1]["use_tf32"] == "1" and p.tf32
    assert "cuda, CUDA graph, TF32 on, GPU 0" in lines[-1]
    assert not load(models["fused"], Factory(), provider="cpu", tf32=True).tf32  # the CPU has no TF32


def test_capture_refused_retries_the_same_provider_without_it(gpu, models, tmp_path):
    msg = "This session cannot use the graph capture feature as requested by the user as all compute graph"
    f = Factory(refuse={("tensorrt", True): msg})
    p = load(models["fused"], f, precision="fp16", engine_cache_dir=str(tmp_path))
    assert [(c[0], c[1]) for c in f.calls] == [("tensorrt", True), ("tensorrt", False)]
    assert (p.provider, p.cuda_graph, p.precision) == ("tensorrt", False, "fp16")
    trt_opts = f.calls[-1][2][0][1]
    assert trt_opts["trt_fp16_enable"] == "1"
    cache = Path(trt_opts["trt_engine_cache_path"])
    assert cache.is_dir() and cache.parent.parent == tmp_path and p.engine_cache == cache
    assert cache.parent.name.startswith("tiny_ant_fused-")


def test_reported_provider_is_where_the_nodes_run(gpu, models):
    """Finding 3: a session registered with TensorRT first whose nodes all went to CUDA is not a
    TensorRT session; one whose GPU EP ORT dropped runs on the CPU."""
    f = Factory(runs_on={"tensorrt": "cuda", "cuda": "cpu"})
    lines: list[str] = []
    p = load(models["fused"], f, lines)
    assert p.provider == "cpu" and p.device_id is None and not p.cuda_graph
    assert [c[0] for c in f.calls] == ["tensorrt", "cuda", "cpu"]
    assert any("tensorrt (fp32, CUDA graph) not used: the session runs on cuda" in line for line in lines)
    with pytest.raises(ModelError, match=r"provider 'cuda' requested but it did not start.*runs on cpu"):
        load(models["fused"], Factory(runs_on={"cuda": "cpu"}), provider="cuda")


def test_explicit_provider_fails_instead_of_falling_back_to_the_cpu(gpu, models):
    f = Factory(refuse={("tensorrt", True): "EP_FAIL: no", ("tensorrt", False): "EP_FAIL: no"})
    with pytest.raises(ModelError, match="provider 'tensorrt' requested but it did not start: tensorrt"):
        load(models["fused"], f, provider="tensorrt")
    assert [c[0] for c in f.calls] == ["tensorrt"]


def test_a_capture_that_fails_in_the_first_runs_is_dropped(gpu, models):
    """Capture happens in a run, not at session creation: the first runs decide whether it is kept."""
    f = Factory(refuse={("tensorrt", True): "EP_FAIL"}, fail_capture_runs=True)
    lines: list[str] = []
    p = load(models["fused"], f, lines)
    assert [(c[0], c[1]) for c in f.calls] == [("tensorrt", True), ("cuda", True), ("cuda", False)]
    assert (p.provider, p.cuda_graph) == ("cuda", False)
    assert any("failed in its first runs" in line for line in lines)


def test_gpu_path_uploads_only_changed_inputs_and_matches_the_cpu(gpu, models):
    """Finding 6: a denoiser chunk uploaded obs, sample and timestep at every step (and device 0 was
    hard-coded); now obs once per chunk, sample and timestep per step, one download per step."""
    cpu = Policy.load(models["denoiser"], provider="cpu", log=lambda _m: None)
    p = load(models["denoiser"], Factory(), provider="cuda", device_id=1, cuda_graph=False)
    assert p.provider == "cuda" and gpu.devices == {1}
    obs = cpu.card.obs_mean + cpu.card.obs_std * np.random.default_rng(0).standard_normal(
        (cpu.card.history, cpu.card.obs_dim)
    )
    gpu.up.clear()
    gpu.down = 0
    out = p.predict(obs, seed=5)
    k = p.steps
    assert len(gpu.up) == 1 + 2 * k and gpu.down == k
    np.testing.assert_array_equal(out, cpu.predict(obs, seed=5))

    fused_cpu = Policy.load(models["fused"], provider="cpu", log=lambda _m: None)
    f = load(models["fused"], Factory(), provider="cuda")
    prefix = np.full((3, f.card.action_dim), 0.1)
    for kw in ({}, {"prefix": prefix}, {}, {}):  # the mask is cleared after an inpainted chunk
        gpu.up.clear()
        np.testing.assert_array_equal(f.predict(obs, seed=1, **kw), fused_cpu.predict(obs, seed=1, **kw))
        assert len(gpu.up) <= 4  # obs, noise (+ prefix, mask when they change)
    gpu.up.clear()
    f.predict(obs, seed=2)
    assert len(gpu.up) == 2  # obs and noise only


def test_gpu_runs_wait_for_the_gpu_lock_and_cpu_runs_do_not(gpu, models):
    """Finding 4: `with GPU_LOCK` (its exclusive side, what a capture holds) holds GPU runs, not CPU ones."""
    g = load(models["fused"], Factory(), provider="cuda")
    c = Policy.load(models["fused"], provider="cpu", log=lambda _m: None)
    obs = np.broadcast_to(g.card.obs_mean, (g.card.history, g.card.obs_dim))
    done = {}

    def run(name, policy):
        policy.predict(obs, seed=0)
        done[name] = True

    with pv.GPU_LOCK:
        threads = [threading.Thread(target=run, args=(n, p)) for n, p in (("gpu", g), ("cpu", c))]
        for t in threads:
            t.start()
        threads[1].join(5.0)
        time.sleep(0.1)
        assert done == {"cpu": True}  # the GPU predict waits, the CPU one does not
    threads[0].join(5.0)
    assert done == {"cpu": True, "gpu": True}


@pytest.mark.parametrize("capture_run", [2, 3, 4, 5])
def test_a_capture_never_overlaps_another_gpu_run_but_other_runs_may(gpu, models, monkeypatch, capture_run):
    """A swap's new session captures in its first runs (ORT's global capture mode: any other thread's CUDA
    call breaks it), so those runs are exclusive; the running policy's replays and the new session's
    other runs share the GPU (before, every run was exclusive and the running policy waited on the swap)."""
    monkeypatch.setattr(GpuStandIn, "CAPTURE_RUN", capture_run)
    GpuStandIn.active = GpuStandIn.max_active = GpuStandIn.capture_overlaps = GpuStandIn.capturing = 0
    f = Factory(run_sleep=0.002)
    running = load(models["fused"], f, provider="cuda", warmup=0)
    obs = np.broadcast_to(running.card.obs_mean, (running.card.history, running.card.obs_dim))
    stop = threading.Event()
    errors: list[Exception] = []

    def control():
        try:
            while not stop.is_set():
                running.predict(obs, seed=0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=control)
    t.start()
    try:
        for _ in range(3):  # the swap thread's loads: capture probe + warm-up on a second session
            new = load(models["denoiser"], f, provider="cuda", warmup=0)
            new.warm_up(4)
    finally:
        stop.set()
        t.join(10)
    assert not errors
    assert f.sessions[0].runs > 3 and all(s.runs > 0 for s in f.sessions)
    assert GpuStandIn.capture_overlaps == 0
    assert GpuStandIn.max_active == 2  # replays overlapped the new sessions' ordinary runs


@pytest.mark.parametrize("capture_run", [2, 3, 4, 5])
def test_predict_is_not_blocked_while_another_policy_loads(gpu, models, monkeypatch, capture_run):
    """Policy A predicts while policy B is inside its session creation, and again while B is inside its
    first (regular, slow: cuDNN start, arena growth) run; only B's capture runs exclude A. Events, no
    timing: B is held at each point until A's predict has returned. Wherever ORT captures among the runs
    providers.CAPTURE_RUNS covers (an H200 with ORT 1.31 showed it is not always run 2 or 3), A and the
    capture never overlap."""
    monkeypatch.setattr(GpuStandIn, "CAPTURE_RUN", capture_run)
    GpuStandIn.capture_overlaps = GpuStandIn.capturing = GpuStandIn.active = 0
    a = load(models["fused"], Factory(), provider="cuda")
    obs = np.broadcast_to(a.card.obs_mean, (a.card.history, a.card.obs_dim))
    in_create, in_first_run, go_on = threading.Event(), threading.Event(), threading.Event()
    held_at: list[str] = []

    def create_hook(_path):
        held_at.append("creation")
        in_create.set()
        assert go_on.wait(10)
        go_on.clear()

    def run_hook(_sess, n):
        if n == 1:
            held_at.append("first run")
            in_first_run.set()
            assert go_on.wait(10)

    fb = Factory(create_hook=create_hook, run_hook=run_hook)
    loaded: list[Policy] = []
    loader = threading.Thread(target=lambda: loaded.append(load(models["fused"], fb, provider="cuda")))
    loader.start()
    try:
        assert in_create.wait(10)
        a.predict(obs, seed=0)  # returns while B is still creating its session
        go_on.set()
        assert in_first_run.wait(10)
        a.predict(obs, seed=1)  # returns while B is inside its first run
        assert not loaded
    finally:
        go_on.set()
        loader.join(10)
    assert held_at == ["creation", "first run"]
    (b,) = loaded
    assert b.cuda_graph and fb.sessions[0].runs >= pv.CAPTURE_RUNS[-1]  # captured inside load()
    assert GpuStandIn.capture_overlaps == 0
    # Run 1, the one that overlaps A, is told not to capture; the later ones may.
    assert fb.sessions[0].graph_ids[:2] == [pv.SKIP_CAPTURE[1], None]


def test_a_predict_waits_for_a_capture_in_progress(gpu, models):
    """The other side: while B's capture run is in progress, A's predict waits until it ends."""
    GpuStandIn.capture_overlaps = GpuStandIn.capturing = GpuStandIn.active = 0
    a = load(models["fused"], Factory(), provider="cuda")
    obs = np.broadcast_to(a.card.obs_mean, (a.card.history, a.card.obs_dim))
    in_capture, go_on = threading.Event(), threading.Event()

    def run_hook(_sess, n):
        if n == GpuStandIn.CAPTURE_RUN:
            in_capture.set()
            assert go_on.wait(10)

    fb = Factory(run_hook=run_hook)
    loader = threading.Thread(target=lambda: load(models["fused"], fb, provider="cuda"))
    loader.start()
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (a.predict(obs, seed=0), done.set()))
    try:
        assert in_capture.wait(10)
        waiter.start()
        assert not done.wait(0.2)  # still waiting (a missed wake-up would make this pass: see below)
    finally:
        go_on.set()
        loader.join(10)
        waiter.join(10)
    assert done.is_set() and GpuStandIn.capture_overlaps == 0


def test_every_run_of_a_gpu_session_is_on_its_own_thread(gpu, models):
    """ORT's CUDA EP keeps a captured graph per calling thread: the capture load() checks must be on the
    thread the node's predicts run on, whichever thread calls predict (the inference worker)."""
    f = Factory()
    p = load(models["fused"], f, provider="cuda")
    obs = np.broadcast_to(p.card.obs_mean, (p.card.history, p.card.obs_dim))
    worker = threading.Thread(target=p.predict, args=(obs,), kwargs={"seed": 0}, name="inference_worker")
    worker.start()
    worker.join(5.0)
    p.predict(obs, seed=1)
    (sess,) = f.sessions
    assert sess.runs >= 5 and sess.threads == {"policy_gpu_tiny_ant_fused"}
    cpu = load(models["fused"], Factory(), provider="cpu")
    assert cpu._device_thread is None  # the CPU path runs on the caller's thread, as before

    GpuStandIn.released_on.clear()
    del p, sess, worker
    f.sessions.clear()
    gc.collect()
    deadline = time.monotonic() + 5.0
    while not GpuStandIn.released_on and time.monotonic() < deadline:
        time.sleep(0.01)
    assert GpuStandIn.released_on == [("policy_gpu_tiny_ant_fused", True)]  # freed there, under the lock
    deadline = time.monotonic() + 5.0
    while any(t.name == "policy_gpu_tiny_ant_fused" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the device thread ends with its policy"
        time.sleep(0.01)
