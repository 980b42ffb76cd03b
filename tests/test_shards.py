"""Streaming safetensors I/O: files that safetensors and from_pretrained accept, read back tensor by tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from swm_hub.core.errors import CorruptWeightsError
from swm_hub.core.shards import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    StreamingShardWriter,
    TensorSpec,
    plan_shards,
)


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(tensor.shape), tensor.dtype)


def write_all(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 10**9) -> list[Path]:
    specs = [spec_of(name, tensor) for name, tensor in tensors.items()]
    with StreamingShardWriter(folder, specs, max_shard_bytes) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return writer.close()


def mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=gen),
        "b.weight": torch.randn(5, 2, generator=gen).to(torch.bfloat16),
        "c.bias": torch.randn(7, generator=gen).to(torch.float16),
        "d.position_ids": torch.arange(6, dtype=torch.int64).reshape(1, 6),
        "e.scalar": torch.tensor(2.5),
        "f.mask": torch.tensor([True, False, True]),
    }


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def test_tensor_spec_nbytes() -> None:
    assert TensorSpec("x", (3, 4), torch.bfloat16).nbytes == 24
    assert TensorSpec("x", (), torch.int64).nbytes == 8
    assert TensorSpec("x", (0, 5), torch.float32).nbytes == 0


def test_round_trip_single_file(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    files = write_all(tmp_path, tensors)
    assert files == [tmp_path / SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists()
    assert_same(load_file(tmp_path / SINGLE_FILE), tensors)


def test_header_is_aligned_and_marked_pt(tmp_path: Path) -> None:
    write_all(tmp_path, mixed_tensors())
    raw = (tmp_path / SINGLE_FILE).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["b.weight"] == {"dtype": "BF16", "shape": [5, 2], "data_offsets": [48, 68]}


def test_non_contiguous_tensor_is_written_in_logical_order(tmp_path: Path) -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    write_all(tmp_path, {"t": tensor})
    assert torch.equal(load_file(tmp_path / SINGLE_FILE)["t"], tensor)


def test_bytes_reach_disk_as_each_tensor_arrives(tmp_path: Path) -> None:
    first, second = torch.ones(100), torch.zeros(100)
    writer = StreamingShardWriter(tmp_path, [spec_of("first", first), spec_of("second", second)])
    writer.write("first", first)
    path = tmp_path / SINGLE_FILE
    length = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + length + first.nbytes
    writer.write("second", second)
    writer.close()
    assert path.stat().st_size == 8 + length + first.nbytes + second.nbytes


def test_empty_checkpoint_is_a_valid_file(tmp_path: Path) -> None:
    assert write_all(tmp_path, {}) == [tmp_path / SINGLE_FILE]
    assert load_file(tmp_path / SINGLE_FILE) == {}


def test_plan_shards_keeps_order_and_isolates_large_tensors() -> None:
    specs = [
        TensorSpec("a", (10,), torch.float32),  # 40 bytes
        TensorSpec("b", (10,), torch.float32),  # 40
        TensorSpec("c", (50,), torch.float32),  # 200: over the limit, alone
        TensorSpec("d", (5,), torch.float32),  # 20
        TensorSpec("e", (20,), torch.float32),  # 80
    ]
    shards = plan_shards(specs, max_shard_bytes=100)
    assert [[spec.name for spec in shard] for shard in shards] == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(specs, max_shard_bytes=10**6) == [specs]
    assert plan_shards([], max_shard_bytes=100) == []
    with pytest.raises(ValueError, match="positive"):
        plan_shards(specs, max_shard_bytes=0)


def test_sharded_write_reads_back(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    files = write_all(tmp_path, tensors, max_shard_bytes=40)
    shards = [path for path in files if path.name != INDEX_FILE]
    assert len(shards) > 2
    assert [path.name for path in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {path.name for path in shards}

    reader = CheckpointReader(tmp_path)
    assert reader.files == shards
    assert reader.spec("b.weight") == TensorSpec("b.weight", (5, 2), torch.bfloat16)
    assert reader.has("a.weight")
    assert not reader.has("missing")
    assert_same(reader.read(tensors), tensors)
    picked = reader.read(["f.mask", "a.weight"])
    assert list(picked) == ["f.mask", "a.weight"]


def test_read_casts_floating_tensors_only(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    write_all(tmp_path, tensors)
    read = CheckpointReader(tmp_path).read(tensors, dtype=torch.float32, device=torch.device("cpu"))
    assert read["b.weight"].dtype == torch.float32
    assert torch.equal(read["b.weight"], tensors["b.weight"].float())
    assert read["d.position_ids"].dtype == torch.int64
    assert read["f.mask"].dtype == torch.bool


def test_reader_matches_save_pretrained(tiny_model_dir: Callable[[str], Path]) -> None:
    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    reader = CheckpointReader(folder)
    assert_same(reader.read(state), dict(state))


def test_strip_prefix_finds_base_model_keys(tmp_path: Path) -> None:
    # GPT-2 on the Hub stores "h.0.attn..." for the model key "transformer.h.0.attn...".
    stored = {"h.0.attn.c_attn.weight": torch.randn(4, 12), "lm_head.weight": torch.randn(3, 4)}
    save_file(stored, tmp_path / SINGLE_FILE, metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path, strip_prefix="transformer")
    key = "transformer.h.0.attn.c_attn.weight"
    assert reader.has(key)
    assert reader.spec(key) == TensorSpec(key, (4, 12), torch.float32)
    read = reader.read([key, "lm_head.weight"])
    assert torch.equal(read[key], stored["h.0.attn.c_attn.weight"])
    assert torch.equal(read["lm_head.weight"], stored["lm_head.weight"])
    assert not CheckpointReader(tmp_path).has(key)
    assert not reader.has("other.h.0.attn.c_attn.weight")


def test_missing_tensor_names_key_and_folder(tmp_path: Path) -> None:
    write_all(tmp_path, {"a": torch.zeros(2)})
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CorruptWeightsError, match="'model.b'") as info:
        reader.read(["a", "model.b"])
    assert info.value.path == str(tmp_path)
    with pytest.raises(CorruptWeightsError, match="'model.b'"):
        reader.spec("model.b")


def test_reader_refuses_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CorruptWeightsError, match="download the model again") as info:
        CheckpointReader(tmp_path)
    assert info.value.path == str(tmp_path)


def test_reader_refuses_truncated_file(tmp_path: Path) -> None:
    write_all(tmp_path, mixed_tensors())
    path = tmp_path / SINGLE_FILE
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptWeightsError, match="header") as info:
        CheckpointReader(tmp_path)
    assert info.value.path == str(path)


def test_reader_refuses_file_shorter_than_its_header_length(tmp_path: Path) -> None:
    (tmp_path / SINGLE_FILE).write_bytes(b"\x10\x00\x00")
    with pytest.raises(CorruptWeightsError):
        CheckpointReader(tmp_path)


def test_reader_refuses_broken_index(tmp_path: Path) -> None:
    write_all(tmp_path, mixed_tensors(), max_shard_bytes=40)
    index = tmp_path / INDEX_FILE
    good = index.read_text()
    index.write_text(good[:20])
    with pytest.raises(CorruptWeightsError, match="JSON"):
        CheckpointReader(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CorruptWeightsError, match="weight_map"):
        CheckpointReader(tmp_path)


def test_reader_refuses_index_naming_missing_shard_or_tensor(tmp_path: Path) -> None:
    write_all(tmp_path, mixed_tensors(), max_shard_bytes=40)
    index = tmp_path / INDEX_FILE
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = data["weight_map"]["a.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptWeightsError, match="'extra.weight'"):
        CheckpointReader(tmp_path)
    data["weight_map"]["extra.weight"] = "model-00099-of-00099.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptWeightsError, match="missing"):
        CheckpointReader(tmp_path)


def test_writer_refuses_wrong_name_shape_or_dtype(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)]
    writer = StreamingShardWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="expected tensor 'a'.*got 'b'"):
        writer.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"expected shape \(2, 3\)"):
        writer.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="expected dtype torch.float32"):
        writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="incomplete.*'b'"):
        writer.close()
    writer.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="already written"):
        writer.write("c", torch.zeros(1))
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write("a", torch.zeros(2, 3))


def test_writer_refuses_duplicate_specs_and_existing_weights(tmp_path: Path) -> None:
    spec = TensorSpec("a", (1,), torch.float32)
    with pytest.raises(ValueError, match="twice"):
        StreamingShardWriter(tmp_path, [spec, spec])
    write_all(tmp_path, {"a": torch.zeros(1)})
    with pytest.raises(FileExistsError, match=SINGLE_FILE):
        StreamingShardWriter(tmp_path, [spec])


def test_exception_in_block_releases_file_without_closing(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    with pytest.raises(RuntimeError, match="boom"), StreamingShardWriter(tmp_path, specs) as writer:
        writer.write("a", torch.zeros(2))
        raise RuntimeError("boom")
    assert writer._handle is None
    assert not (tmp_path / INDEX_FILE).exists()


def test_sharded_llama_loads_with_from_pretrained(tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    state = {name: tensor.clone() for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    config.save_pretrained(tmp_path)
    files = write_all(tmp_path, state, max_shard_bytes=3000)
    assert len(files) > 3  # several shards and the index

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    assert_same(dict(loaded), state)
    assert_same(CheckpointReader(tmp_path).read(state), state)
