"""The model: loaded on configure, swapped at runtime when `model_path` is set, reported on ~/model.

A swap checks the file and its card against the configuration in the parameter call (the card reader
seeks past the weights: a few small reads, whatever the model's size), so a model that does not fit is
refused in the call's answer; a loader thread hashes, loads and warms up the new model, then swaps it in
between two ticks. Any failure keeps the old model running, says why (log, /diagnostics,
~/model) and puts `model_path` back. The replaced model is freed right after a tick, once the core no
longer uses it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.core.card_source import ModelError, card_of_model
from diffusion_controller.core.controller import ControlCore
from diffusion_controller.core.inputs import SourceDecoder, SourceReader, implausible_policy
from diffusion_controller.core.plausibility import Plausibility, PlausibilityLimits, PublisherAgreement
from diffusion_controller.core.runtime import Policy
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import diagnostics as dg
from diffusion_controller.ros.binding import Binding, control_config, validate_against_card
from diffusion_controller.ros.loop import nicer_thread, set_thread_cpus, set_thread_priority

if TYPE_CHECKING:  # node_diagnostics reports on the swapper: imported for the annotation only
    from diffusion_controller.ros.node_diagnostics import NodeDiagnostics

MIB = 1024 * 1024
#: ~/model is latched: a late subscriber (a dashboard, a test) gets the current model at once.
MODEL_QOS = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
#: How much nicer than the node a model-swap loader thread runs: its warm-up predicts share the CPU with
#: the inference of the model that is still driving the robot, which must win.
LOADER_NICE_INCREMENT = 10


def file_sha256(path: str) -> str:
    """The model file's SHA-256 (hex), published on ~/model so an operator knows which weights drive."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            digest.update(block)  # hashlib releases the GIL for blocks this large
    return digest.hexdigest()


def check_model_file(path: str, max_mb: float) -> int:
    """Size of the model file at `path` (bytes) after the checks that need no reading; ConfigError else."""
    if not path:
        raise cf.ConfigError("model_path is empty; set it to an .onnx policy with a model card")
    if os.path.isdir(path):
        raise cf.ConfigError(f"model_path '{path}' is a directory, not an .onnx model file")
    if not os.path.isfile(path):
        raise cf.ConfigError(f"model_path '{path}' does not exist")
    size = os.path.getsize(path)
    if size > max_mb * MIB:
        raise cf.ConfigError(
            f"model_path '{path}' is {size / MIB:.1f} MiB, more than max_model_mb ({max_mb:g}); raise "
            "max_model_mb to load it"
        )
    return size


def check_swap_fits(running: Binding, new: Binding) -> None:
    """A swap keeps what the robot side is wired to: the published joints and the control period."""
    if new.output_joints != running.output_joints:
        raise cf.ConfigError(
            f"its action joints {list(new.output_joints)} change the published joints "
            f"{list(running.output_joints)}; set `joints` to pin the order"
        )
    if abs(new.period_s - running.period_s) > 1e-9:
        raise cf.ConfigError(
            f"control period {new.period_s:.4f} s differs from the running {running.period_s:.4f} s; "
            "set rate_hz or reconfigure"
        )


def check_same_kind(running: Any, new: Any) -> None:
    """A swap keeps the action kind: the robot's controller takes one interface (positions, velocities,
    efforts or a Twist); another kind needs a reconfigure with outputs for it."""
    old_kind, new_kind = getattr(running, "action_kind", "position"), getattr(new, "action_kind", "position")
    if new_kind != old_kind:
        raise cf.ConfigError(f"its action kind is {new_kind!r}, the running model's {old_kind!r}; "
                             "reconfigure with outputs for it")  # fmt: skip


@dataclass
class Loaded:
    """What configure built for one model. A swap replaces policy, binding, readers, path and sha256 in
    place, under the node's lock; the control loop reads them under it every tick."""

    cfg: cf.NodeConfig
    core: ControlCore
    policy: Any
    binding: Binding
    readers: dict[str, SourceReader]
    path: str
    sha256: str


#: How long a failed swap waits for the parameter set that started it to be stored before it reverts.
REVERT_WAIT_S = 2.0


class ModelPathRevert:
    """Sets `model_path` back to the running model after a failed swap (the controller's and the policy
    node's). rclpy stores the value of the set that started the swap only after its callback returns: a
    loader that fails at once must wait for that, or that set would overwrite the revert. `active` while
    the revert's own set runs, so the parameter callback does not take it for a swap request."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.active = False

    def __call__(self, attempted: str, old_path: str) -> None:
        deadline = time.monotonic() + REVERT_WAIT_S
        while self._node.get_parameter("model_path").value != attempted and time.monotonic() < deadline:
            time.sleep(0.005)
        self.active = True
        try:
            self._node.set_parameters([Parameter("model_path", value=old_path)])
        finally:
            self.active = False


class ModelSwapper:
    """Loads the configured model, swaps it on a `model_path` set, publishes ~/model, frees replaced ones.

    `node` is used for what rclpy does (the ~/model publisher, the log, `model_path` set back after a
    failed swap); `loaded` returns the node's current model (None while unconfigured), read when a swap
    starts, when it lands (under `lock`) and for ~/model; `diagnostics` hears of refusals and failures.
    """

    def __init__(
        self, node: Node, lock: threading.Lock, diagnostics: NodeDiagnostics,
        loaded: Callable[[], Loaded | None],
    ) -> None:  # fmt: skip
        self._node, self._lock, self._diag, self._loaded = node, lock, diagnostics, loaded
        self._log = node.get_logger()
        self._pub = node.create_publisher(DiagnosticStatus, "~/model", MODEL_QOS)
        self.swaps = 0
        self.failures = 0
        self.target = ""  # the path being loaded
        self.thread: threading.Thread | None = None
        self._revert = ModelPathRevert(node)
        self.retired: list[Any] = []  # replaced policies, freed right after a tick (free_retired)

    @property
    def reverting(self) -> bool:
        """The loader is putting model_path back (that set is not a swap request)."""
        return self._revert.active

    # -- configure -----------------------------------------------------------------------------------------
    def check(self, cfg: cf.NodeConfig, path: str, max_mb: float) -> tuple[ModelCard, Binding]:
        """The part before any session exists: the file, its card, and the card vs the config."""
        check_model_file(path, max_mb)
        card = card_of_model(path, reconcile=False)  # the loader's full load reconciles a .yaml beside
        return card, validate_against_card(cfg, card)

    def load(self, cfg: cf.NodeConfig) -> Loaded:
        """Configure's model: checked, loaded + warmed up, and a core running it."""
        card, binding = self.check(cfg, cfg.model_path, cfg.max_model_mb)
        if cfg.policy_source == "remote":  # a policy node computes the chunks: the card is all we need
            sha256 = file_sha256(cfg.model_path)
            core = ControlCore(card, control_config(cfg, binding, card), external=True)
            readers = self._make_readers(cfg, card, binding)
            return Loaded(cfg, core, None, binding, readers, cfg.model_path, sha256)
        policy = self._load_policy(cfg, cfg.model_path)
        sha256 = file_sha256(cfg.model_path)
        core = ControlCore(policy.card, control_config(cfg, binding, policy.card), policy)
        readers = self._make_readers(cfg, policy.card, binding)
        return Loaded(cfg, core, policy, binding, readers, cfg.model_path, sha256)

    def _load_policy(self, cfg: cf.NodeConfig, path: str, warmup: int = 3) -> Any:
        return Policy.load(
            path, provider=cfg.provider, threads=cfg.threads, steps=cfg.steps or None, warmup=warmup,
            log=lambda m: self._log.info(str(m)), precision=cfg.precision, cuda_graph=cfg.cuda_graph,
            device_id=cfg.device_id, engine_cache_dir=cfg.engine_cache_dir, tf32=cfg.tf32,
        )  # fmt: skip

    def _make_readers(
        self, cfg: cf.NodeConfig, card: ModelCard, binding: Binding
    ) -> dict[str, SourceReader]:
        readers = {}
        plausible = Plausibility(
            card, PlausibilityLimits(cfg.joint_margin, cfg.command_sigmas, cfg.sensor_sigmas)
        )
        for src in cfg.sources:
            decoder = SourceDecoder(src, card.features, binding.rename)
            readers[src.name] = SourceReader(
                decoder, cfg.max_future_s, plausibility=plausible, policy=implausible_policy(src, card),
                on_note=lambda cause, text, n=src.name: self._diag.note(n, cause, text),
                agreement=PublisherAgreement(card),
            )  # fmt: skip
        return readers

    # -- swapping ------------------------------------------------------------------------------------------
    def begin(self, path: str, max_mb: float) -> str:
        """Start loading a new model_path in the background; '' or why not (also logged, counted and on
        /diagnostics: said where an operator looks, not only in the caller's reply). The file and its card
        are checked against the configuration here; the loader thread loads (and checks the rest)."""
        loaded = self._loaded()
        if loaded is None:
            return ""
        if loaded.policy is None:
            return ("policy.source is remote: the model is swapped on the policy node (its model_path); "
                    "here model_path only gives the card, read on configure")
        if self.thread is not None:
            reason = f"a model swap to '{self.target}' is still loading; try again when it is done"
        else:
            try:  # the card against the configuration: cheap (read_onnx_metadata seeks, never reads weights)
                card, binding = self.check(loaded.cfg, path, max_mb)
                check_same_kind(loaded.policy.card, card)
                check_swap_fits(loaded.binding, binding)
                reason = ""
            except (cf.ConfigError, CardError, ModelError, OSError) as exc:
                reason = f"model_path rejected, the old model keeps running: {exc}"
        if reason:
            self.failures += 1
            self._diag.record_error(reason)
            self._log.warning(reason)
            return reason
        self.target = path
        self.thread = threading.Thread(
            target=self._swap, args=(loaded, path, max_mb), name="model_swap", daemon=True
        )
        self.thread.start()
        self._log.info(f"model swap: loading '{path}' in the background")
        self.publish("loading", dg.WARN, f"loading '{path}'; the old model keeps running meanwhile")
        return ""

    def _swap(self, loaded: Loaded, path: str, max_mb: float) -> None:
        """Loader thread: read and check the card, hash, load + warm up, then swap between two ticks; on
        any failure keep the old model, say why (log, /diagnostics, ~/model) and put model_path back."""
        set_thread_priority(0)  # started from a real-time executor thread: loading is not real-time work
        cfg, old_path = loaded.cfg, loaded.path
        set_thread_cpus(cfg.model_cpu_affinity)  # and not on the loop's CPUs (ORT's threads inherit them)
        try:
            card, binding = self.check(cfg, path, max_mb)
            check_same_kind(loaded.policy.card, card)
            check_swap_fits(loaded.binding, binding)
            sha256 = file_sha256(path)
            policy = self._load_policy(cfg, path, warmup=0)
            with nicer_thread(LOADER_NICE_INCREMENT):  # warm-up must not take CPU from the running model
                policy.warm_up()
            readers = self._make_readers(cfg, policy.card, binding)
            with self._lock:
                if self._loaded() is not loaded:
                    return  # cleaned up meanwhile
                loaded.core.swap_policy(policy)
                self.retired.append(loaded.policy)
                loaded.policy, loaded.binding, loaded.readers = policy, binding, readers
                loaded.path, loaded.sha256 = path, sha256
            gc.freeze()  # the new model's objects are long-lived too (see the node's configure)
            self.swaps += 1
            self._log.info(f"model swap: now running '{card.name}' {card.version} on {policy.provider}")
            self.publish("swapped", dg.OK, f"running '{card.name}' {card.version}")
        except Exception as exc:  # any failure: the old model keeps running
            # model_path names the running model again before anyone hears of the failure.
            self._revert(path, old_path)
            self.failures += 1
            why = f"model swap to '{path}' failed, the old model keeps running: {exc}"
            self._diag.error(why)
            self.publish("failed", dg.ERROR, why, attempted=path)
        finally:
            self.thread = None

    def free_retired(self, core: ControlCore) -> None:
        """Free a policy replaced by a swap, here, right after a tick has published. Destroying an ONNX
        Runtime session holds the GIL (~10 ms for a DiffuseLoco-size model); here that falls into the
        slack before the next tick instead of delaying one. Waits while the core still uses it (a predict
        in flight, a result not yet taken)."""
        if not core.uses(self.retired[0]):
            del self.retired[0]  # the last reference: freed now

    def release(self) -> None:
        """Drop the replaced policies at cleanup: the core that used them is closed."""
        self.retired = []

    def join(self, timeout: float) -> None:
        """Wait for a loader thread still running (process exit)."""
        thread = self.thread
        if thread is not None:
            thread.join(timeout=timeout)

    # -- ~/model -------------------------------------------------------------------------------------------
    def publish(self, event: str, level: int, message: str, attempted: str = "") -> None:
        """One ~/model status: what runs now (name, version, path, SHA-256, provider) and what happened."""
        loaded = self._loaded()
        policy = loaded.policy if loaded is not None else None
        card = loaded.core.card if loaded is not None else None
        values = {
            "event": event,
            "path": loaded.path if loaded is not None else "",
            "name": card.name if card is not None else "",
            "version": card.version if card is not None else "",
            "sha256": loaded.sha256 if loaded is not None else "",
            "provider": str(getattr(policy, "provider", "")),
            "steps": str(getattr(policy, "steps", "")),
            "swaps": str(self.swaps),
            "swap_failures": str(self.failures),
            "attempted_path": attempted,
        }
        name = f"{self._node.get_fully_qualified_name()}: model"
        msg = DiagnosticStatus(level=bytes([level]), name=name, message=message[:1000])
        msg.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        with contextlib.suppress(Exception):  # a status message must never cost a swap or a transition
            self._pub.publish(msg)
