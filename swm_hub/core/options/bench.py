"""How ``bench`` times a model: the backend, the device and precision, and the lengths and runs measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.options.common import dtype_name

Backend = Literal["torch", "onnxruntime", "genai"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "genai")
BENCH_HELP: dict[str, str] = {
    "backend": "torch, onnxruntime (a folder with an ONNX export) or genai (a folder with a genai export)",
    "device": "cpu or cuda",
    "dtype": "torch backend: float32, bfloat16 or float16 (fp32, bf16, fp16 also accepted; default float16 on "
    "cuda, float32 on cpu)",
    "prompt_tokens": "prompt length in tokens",
    "new_tokens": "tokens generated per run",
    "runs": "timed runs per model, after one warm-up",
    "compiled": "static KV cache + torch.compile (default on CUDA)",
    "threads": "CPU threads (default: torch's)",
}


@dataclass(frozen=True)
class BenchOptions:
    """What to time and how; ``compiled`` and ``dtype`` left unset take the device's default.

    The device (``cpu`` or ``cuda``) is checked against the machine when the benchmark starts.

    Attributes:
        prompt_tokens: exact prompt length in tokens.
        new_tokens: exact number of generated tokens (at least 2, so that decoding is measured).
        runs: timed runs per model.
        warmup: discarded runs per model before the timed ones (at least 1 on the compiled path, whose first
            run compiles).
        compiled: the static-cache ``torch.compile`` path; default on for torch on CUDA, and only possible
            there.
        dtype: for torch (default float16 on CUDA, float32 on the CPU); ONNX Runtime runs the export's own.
        threads: CPU threads for torch and ONNX Runtime during the benchmark (default: theirs, one per core);
            on a busy machine fewer threads than cores avoid stalls while threads wait for each other.
    """

    backend: Backend = "torch"
    device: str = "cpu"
    prompt_tokens: int = 12
    new_tokens: int = 128
    runs: int = 5
    warmup: int = 1
    compiled: bool | None = None
    dtype: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidOptionError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.runs < 1 or self.warmup < 0:
            raise InvalidOptionError(
                "bench needs --prompt-tokens >= 1, --new-tokens >= 2, --runs >= 1 and --warmup >= 0 "
                f"(got {self.prompt_tokens}, {self.new_tokens}, {self.runs}, {self.warmup})"
            )
        if self.threads is not None and self.threads < 1:
            raise InvalidOptionError(f"--threads must be at least 1, got {self.threads}")
        if self.dtype is not None:
            if self.backend != "torch":
                raise InvalidOptionError(
                    f"--dtype applies to the torch backend; {self.backend} runs the export's own dtype"
                )
            object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.backend == "genai" and self.device != "cpu":
            raise InvalidOptionError("--backend genai runs onnxruntime-genai's CPU build: use --device cpu")
        if self.compiled and (self.backend != "torch" or self.device != "cuda"):
            raise InvalidOptionError(
                "the compiled path (static KV cache + torch.compile) needs --backend torch --device cuda"
            )

    @property
    def uses_compile(self) -> bool:
        """The compiled path: asked for, or by default on torch with CUDA."""
        if self.compiled is None:
            return self.backend == "torch" and self.device == "cuda"
        return self.compiled

    @property
    def torch_dtype_name(self) -> str:
        """float16 on CUDA, where it is what is deployed; float32 on the CPU, whose float16 kernels are slow."""
        if self.dtype is not None:
            return self.dtype
        return "float16" if self.device == "cuda" else "float32"
