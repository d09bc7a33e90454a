"""Post-training quantisation of our GPT with torchao, for inference on the CPU (`python -m pipeline stage=quantize`).

Two methods, both on the Linear layers of the blocks (q_proj, kv_proj, out_proj, up_proj, down_proj):

- int8: int8 weights, one scale per output row, and int8 activations quantised per token at every
  call (torchao's `Int8DynamicActivationInt8WeightConfig`, its `Int8Tensor`): the matmul is int8 x
  int8 -> int32 (`torch._int_mm`), rescaled by both scales.
- int4: int4 weights in groups of `group_size` inputs, each group with a float scale and zero point
  (asymmetric, the tinygemm scheme); weight-only, activations stay float. torchao 0.18's stable
  `Int4WeightOnlyConfig` has no CPU layout (its plain and tile-packed formats call CUDA kernels); its
  `PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`) runs ATen's `_weight_int4pack_mm_for_cpu`,
  which is what int4 uses here. That kernel is about 5x slower with float32 activations than with
  bfloat16 on this CPU, so int4 computes in bfloat16 unless told otherwise (`dtype`).

lm_head is quantised only when it is untied from the embedding: tied (the default) it *is* the
embedding matrix, and a quantised copy beside the float embedding would make the file larger, not
smaller. Embeddings and norms stay float, in `dtype`, and the KV cache follows them (new_kv_cache
takes the embedding's dtype).

What a file holds (runs.save_model / runs.build_model): plain tensors only, since model.pt is read
with weights_only=True: per quantised layer its integer weights (int8; int4 two to a byte) and
scales (and zeros). `install` rebuilds the torchao tensors from them. torchao's packed int4 tensor
is not stored: `_convert_weight_to_int4pack_for_cpu` lays the nibbles out for the vector width of
the CPU it runs on, so such a file would be misread on another kind of CPU.

The weights are quantised with torchao's own primitives into the same tensors that
`quantize_(model, Int8DynamicActivationInt8WeightConfig())` and
`quantize_(model, PrototypeInt4WeightOnlyConfig(group_size))` build (tests/stages/test_quantize.py
checks equal logits), without quantize_'s global side effect (it sets torch.compile's inductor options).

A quantised model is for inference on the CPU: its weights are not trainable (runs.load_start
refuses it to the training stages), and the int4 kernel has no GPU path (`place` keeps it on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from pipeline.errors import UserError
from pipeline.model.gpt import GPT

log = logging.getLogger(__name__)

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)  # what Int4OpaqueTensor and the CPU int4 kernel take
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = {"int8": "float32", "int4": "bfloat16"}  # dtype=auto; int4 in float32 is ~5x slower here (module docstring)
PROJECTIONS = ("q_proj", "kv_proj", "out_proj", "up_proj", "down_proj")
INT4_MID = 8  # tinygemm's zero point sits at the middle of 0..15: w = (q - 8) * scale + zero
INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in sixteens


@dataclass(frozen=True)
class QuantSettings:
    method: str = "int8"  # int8 | int4
    group_size: int | None = None  # int4: inputs per scale and zero (32, 64 or 128); None for int8
    dtype: str = "float32"  # the activations and the unquantised weights (embedding, norms)
    lm_head: bool = False  # lm_head quantised too (only when untied from the embedding)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantize: method={self.method!r} must be one of {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantize: group_size={self.group_size!r} must be one of {', '.join(map(str, GROUP_SIZES))} for int4")
        if self.dtype not in DTYPES:
            raise ValueError(f"quantize: dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "QuantSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"quantize: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def settings_for(method: str, group_size: int, dtype: str, tied: bool) -> QuantSettings:
    """The settings a stage's config asks for, `dtype=auto` resolved by method; lm_head is quantised where it is untied."""
    return QuantSettings(
        method=method,
        group_size=int(group_size) if method == "int4" else None,
        dtype=DEFAULT_DTYPE.get(method, "float32") if dtype == "auto" else dtype,
        lm_head=not tied,
    )


@contextlib.contextmanager
def _quiet_import():
    """torchao's import logs a warning for each CUDA extension it cannot load (none is needed on the CPU), and
    torch one for an enum torchao registers: neither says anything about our run, so they are kept off the console."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require_torchao(source) -> None:
    """torchao computes a quantised model: say so, naming the file, where it is not installed."""
    try:
        with _quiet_import():
            import torchao  # noqa: F401
    except ImportError:
        raise UserError(f"{source} is a quantised model, which needs torchao: pip install 'torchao>=0.18'") from None


def torchao_version() -> str:
    with _quiet_import():
        import torchao
    return torchao.__version__


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant_settings", None) is not None


def targets(model: GPT, settings: QuantSettings) -> tuple[list[str], list[str]]:
    """(the Linear layers to quantise, those left float): every block projection, lm_head where untied and asked for.

    int4 needs the input width to be a multiple of group_size (torchao's quantize_ skips a layer
    where it is not) and the output width a multiple of 16 (the CPU kernel's packing): a layer that
    does not fit stays float, and is named in the second list.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.") and n.rsplit(".", 1)[-1] in PROJECTIONS]
    if settings.lm_head and model.lm_head.weight is not model.wte.weight:
        names.append("lm_head")
    modules = dict(model.named_modules())
    fits = lambda n: settings.method != "int4" or (modules[n].in_features % settings.group_size == 0 and modules[n].out_features % INT4_ROWS == 0)  # noqa: E731
    return [n for n in names if fits(n)], [n for n in names if not fits(n)]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values 0..15 (N, K), K even, as uint8 (N, K/2): element 2i in the low nibble, 2i+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4 undone: (N, K/2) uint8 -> (N, K) int32 in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2).to(torch.int32)


def quantize_weight(weight: torch.Tensor, settings: QuantSettings) -> dict[str, torch.Tensor]:
    """A Linear weight (N, K), already in settings.dtype, as the plain tensors a file holds.

    int8: qdata int8 (N, K), scale float32 (N, 1): Int8Tensor.from_hp, symmetric, per row (torchao's default).
    int4: qdata uint8 (N, K/2) (pack_int4), scale and zero (N, K/group_size) in the weight's dtype:
    the tinygemm parameters Int4OpaqueTensor.from_hp chooses.
    """
    with _quiet_import():
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quant_primitives import MappingType, _choose_qparams_affine_tinygemm, _quantize_affine_tinygemm
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    weight = weight.detach()
    if settings.method == "int8":
        t = Int8Tensor.from_hp(weight, PerRow())
        return {"qdata": t.qdata.contiguous(), "scale": t.scale.contiguous()}
    block = [1, settings.group_size]
    scale, zero = _choose_qparams_affine_tinygemm(weight, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6, None, weight.dtype)
    q = _quantize_affine_tinygemm(weight, block, scale, zero, torch.int32, 0, 15)
    N = weight.shape[0]
    return {"qdata": pack_int4(q), "scale": scale.reshape(N, -1).contiguous(), "zero": zero.reshape(N, -1).contiguous()}


def torchao_weight(plain: dict[str, torch.Tensor], settings: QuantSettings) -> torch.Tensor:
    """The torchao tensor subclass that computes with plain's weights: Int8Tensor (int8) or Int4OpaqueTensor (int4)."""
    with _quiet_import():
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    if settings.method == "int8":
        qdata, scale = plain["qdata"], plain["scale"]
        activations = QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
        return Int8Tensor(qdata, scale, [1, qdata.shape[1]], settings.torch_dtype, act_quant_kwargs=activations)
    q = unpack_int4(plain["qdata"])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # innerKTiles: unused on the CPU
    scale_and_zero = pack_tinygemm_scales_and_zeros(plain["scale"], plain["zero"], plain["scale"].dtype)
    return Int4OpaqueTensor(qdata=packed, scale_and_zero=scale_and_zero, block_size=[1, settings.group_size], shape=q.shape, act_pre_scale=None)


def dequantize_weight(plain: dict[str, torch.Tensor], settings: QuantSettings, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (N, K) that plain's integers and scales stand for (what an export writes)."""
    if settings.method == "int8":
        return (plain["qdata"].to(torch.float32) * plain["scale"].to(torch.float32)).to(dtype)
    q = unpack_int4(plain["qdata"]).to(torch.float32)
    N, K = q.shape
    g = settings.group_size
    scale, zero = plain["scale"].to(torch.float32)[..., None], plain["zero"].to(torch.float32)[..., None]
    w = (q.view(N, K // g, g) - INT4_MID) * scale + zero
    return w.reshape(N, K).to(dtype)


def cast_weights(model: GPT, dtype: torch.dtype) -> None:
    """Parameters to dtype; buffers (the rotary tables) stay float32, so positions are as exact as in the float model."""
    buffers = dict(model.named_buffers())
    model.to(dtype)
    for name, buffer in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, buffer)


def install(model: GPT, state: dict[str, dict[str, torch.Tensor]], settings: QuantSettings) -> GPT:
    """Put quantised weights into a model already cast to settings.dtype: state maps a Linear's name to its plain tensors."""
    for name, plain in state.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"quantize: {name} is a {type(module).__name__}, not a Linear layer")
        expected = (module.out_features, module.in_features)
        if settings.method == "int8" and tuple(plain["qdata"].shape) != expected or settings.method == "int4" and tuple(plain["qdata"].shape) != (expected[0], expected[1] // 2):
            raise ValueError(f"quantize: {name} holds weights of shape {tuple(plain['qdata'].shape)} for a layer of {expected}")
        module.weight = nn.Parameter(torchao_weight(plain, settings), requires_grad=False)
    model.quant_settings = settings
    model.quant_state = state  # the plain tensors: what save_model writes (torchao's packed int4 is CPU-specific)
    model.requires_grad_(False)
    return model


def quantize_model(model: GPT, settings: QuantSettings) -> GPT:
    """Quantise a float GPT in place (its target layers, the rest cast to settings.dtype) and return it, ready for generate."""
    if is_quantized(model):
        raise ValueError("quantize: the model is quantised already")
    model.eval()
    cast_weights(model, settings.torch_dtype)
    names, left = targets(model, settings)
    if left:
        log.warning("int4 with group_size=%d leaves %s float (input width not a multiple of it, or output width not of %d)", settings.group_size, ", ".join(left), INT4_ROWS)
    state = {name: quantize_weight(model.get_submodule(name).weight, settings) for name in names}
    return install(model, state, settings)


def float_state(model: GPT) -> dict[str, torch.Tensor]:
    """The unquantised tensors of a quantised model (embedding, norms), in the dtype it computes in."""
    quantised = {f"{name}.weight" for name in model.quant_state}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in quantised}


def dequantized(model: GPT) -> GPT:
    """A plain float32 GPT with the quantised model's weights as floats: what transformers can load (export)."""
    settings = model.quant_settings
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's random stream
        plain = type(model)(model.config)
    state = {k: v.float() for k, v in float_state(model).items()}
    for name, tensors in model.quant_state.items():
        state[f"{name}.weight"] = dequantize_weight(tensors, settings)
    plain.load_state_dict(state, strict=True)  # a tied lm_head is the embedding, among the float tensors
    return plain.eval()


def place(model: GPT, device: str | torch.device) -> GPT:
    """Move a model to device, except a quantised one, which stays on the CPU its kernels are for (said once in the log)."""
    device = torch.device(device)
    if is_quantized(model) and device.type != "cpu":
        log.info("a %s-quantised model runs on the CPU (torchao's CPU kernels): it stays there rather than move to %s", model.quant_settings.method, device)
        return model
    return model.to(device)


def record(model: GPT) -> dict:
    """What a file says of its quantisation (payload["quant"]): the settings, the layers (quantised and left float), the torchao that made them."""
    names, left = targets(model, model.quant_settings)
    return {"settings": model.quant_settings.to_dict(), "modules": sorted(model.quant_state), "float_modules": [n for n in names + left if n not in model.quant_state], "torchao": torchao_version()}
