"""The model_path check in the parameter call: the card of a huge model is read without its weights."""

from __future__ import annotations

import io
import time
from pathlib import Path

from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.card_schema import METADATA_KEY
from diffusion_controller.core.card_source import card_of_model
from diffusion_controller.core.onnx_metadata import read_onnx_metadata
from diffusion_controller.ros import config as cf
from diffusion_controller.ros.binding import validate_against_card
from diffusion_controller.ros.params_file import load_params_file

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num: int, payload: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def huge_model(path: Path, card_yaml: str, weights_mib: int = 768) -> Path:
    """An ONNX ModelProto's shape: a `weights_mib` graph field (a sparse hole), then the card in
    metadata_props; the disk holds a few kB."""
    with open(path, "wb") as f:
        f.write(varint(7 << 3 | 2) + varint(weights_mib * MIB))  # graph, length-delimited
        f.seek(weights_mib * MIB, io.SEEK_CUR)
        entry = field(1, METADATA_KEY.encode()) + field(2, card_yaml.encode())
        f.write(field(14, entry))  # metadata_props
    return path


class CountingFile(io.FileIO):
    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        CountingFile.read_bytes += len(data)
        return data


def test_the_card_of_a_768_mib_model_is_read_with_a_few_small_reads(tmp_path):
    yaml_text = (ROOT / "models" / "ant_locomotion.yaml").read_text()
    path = huge_model(tmp_path / "huge.onnx", yaml_text)
    assert path.stat().st_size > 768 * MIB
    CountingFile.read_bytes = 0
    with CountingFile(path, "rb") as f:
        props = read_onnx_metadata(f)
    assert ModelCard.from_yaml_text(props[METADATA_KEY]).name == "ant_locomotion"
    assert CountingFile.read_bytes < len(yaml_text) + 4096  # the card and field headers, no weights
    # What the parameter call does with it: the card read and checked against the configuration.
    cfg = cf.NodeConfig.from_params(load_params_file(str(ROOT / "config" / "ant.yaml")))
    t0 = time.perf_counter()
    validate_against_card(cfg, card_of_model(str(path), reconcile=False))
    print(f"card read + checked for a 768 MiB model in {(time.perf_counter() - t0) * 1000:.1f} ms")
