"""Build the Qwen2 decoder-with-past ONNX graph directly from the weights (no torch).

Three profiles share one structure:
  portable: standard ONNX ops only (opset 17), so it loads in tract as well as ONNX Runtime;
  ort:      ONNX Runtime contrib ops (GroupQueryAttention with rotary, SkipSimplifiedLayerNormalization,
            MatMulNBits for int4 and int8, the LM head included), the fast path for ONNX Runtime; an input
            `logits_to_keep` limits the logits to the last positions;
  gpu:      the ort profile's graph computing in float16, with a float16 KV cache (what GroupQueryAttention
            on CUDA takes), for GPU execution providers; fp16 and int4 weights. Stored tensors keep the
            bundle format's types (norms, biases, scales and rotary tables float32): their Casts to float16
            are constants, folded by ONNX Runtime at load. Logits come out float32.
Every weight keeps its Hugging Face [out, in] layout: no transposed copy of any weight exists. In profile
portable the residual stream is 2-D ([batch*seq, hidden]) so every Linear is one Gemm with transB=1; in
profile ort it is 3-D ([batch, seq, hidden], what MatMulNBits, GroupQueryAttention and the layer norms take)
and float Linears are FusedMatMul with transB=1: no Reshape between the operators of a layer (52 of them
cost the 0.5B model 5% of its decode time).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .checkpoint import Checkpoint, Dims, expected_shape, rotary_inv_freq
from .errors import ExportError
from .jobs import TensorJobs
from .quantize import (INT4_BLOCK, INT8_BLOCK, KQ_SUPER, Q6_SUB, Q6_SUPER, int4k_from_q4_k, q6k_from_q6_k,
                       pack_kquant_codes, quantize_q6k, quantize_int4_blocks, quantize_int4k,
                       quantize_int8_blocks, quantize_int8_rows)

OPSET = 17
MS_DOMAIN = "com.microsoft"
# MatMulNBits' accuracy_level on CPU: 4 quantizes the activations to int8 and multiplies with int8 dot
# products (issue 4's note: int4-ort decode 6.8 -> 8.8 tokens/s); GPU variants want 0.
ORT_CPU_ACCURACY_LEVEL = 4
# Profile ort's input: how many positions, counted from the end, get logits (1 while generating).
LOGITS_TO_KEEP = "logits_to_keep"
# The int4 copy of a tied embedding that an ort int4 variant multiplies as its LM head.
TIED_INT4_HEAD = "lm_head.tied_int4"
# Profile ort's fused Q, K and V projection of a layer (weight and bias), under `model.layers.N.`.
FUSED_QKV = "self_attn.qkv_proj"
# Precisions of the float16-compute profile.
GPU_PRECISIONS = ("fp16", "int4")
# Precisions written for the portable profile only (ONNX Runtime's MatMulNBits takes no float min per block).
PORTABLE_ONLY_PRECISIONS = ("int4k",)
# Quantized GGUF types of more than 5 bits per weight: int4k keeps such tensors wide (the producer of a
# quantized GGUF chose them). Float tensors carry no such choice.
WIDE_GGUF_TYPES = {"Q6_K", "Q8_0", "Q8_1", "Q8_K"}
EIGHT_BIT_GGUF_TYPES = {"Q8_0", "Q8_1", "Q8_K"}
FLOAT_GGUF_TYPES = {"F32", "F16", "BF16", "F64"}
# Which matrices int4k keeps wide, at 6 or 8 bits (Weights._sensitive; the option's name predates q6k):
# "auto", Q4_K_M's choice; "attn-v", only the value projections of that choice; "none".
INT4K_8BIT_CHOICES = ("auto", "attn-v", "none")
# How int4k stores those matrices: "q6k" (6.56 bits per weight; a GGUF's Q6_K tensors carried over bit for
# bit), or "int8" per row (8 bits, what int4k stored before q6k).
INT4K_WIDE_FORMATS = ("q6k", "int8")
# Variant entry key of profile ort and gpu graphs: their attention_mask may be wider than the sequence,
# zero-padded on the right (a caller keeps one mask of its cache's capacity instead of a new one per step).
PADDED_MASK = "padded_attention_mask"
NEG_INF = np.finfo(np.float32).min  # masked scores; -inf would give NaN on fully masked rows
ALIGN = 64


class ExternalData:
    """The variant's model.onnx.data: tensors 64-byte aligned, in the order they are reserved; each is written
    to its reserved place when it is ready (tensor jobs may finish in any order)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def reserve(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[TensorProto, int, int]:
        start = self.offset + (-self.offset) % ALIGN
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.offset = start + nbytes
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor, start, nbytes

    def write(self, start: int, arr: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(arr)).cast("B")
        while view:  # pwrite may write less than asked
            done = os.pwrite(self.file.fileno(), view, start)
            view, start = view[done:], start + done

    def close(self) -> None:
        # Alignment gaps are holes, read back as the zeros they stand for; the size covers the last tensor.
        self.file.truncate(self.offset)
        self.file.close()


class GraphBuilder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0
        self._consts: dict = {}

    def op(self, op_type: str, inputs: list[str], *, outputs=1, names=None, domain: str = "", **attrs):
        """Adds a node; returns its output name (a list of them for several). `names` gives the outputs'
        names, where None means a fresh name and "" an optional output left out."""
        self._count += 1
        node_name = f"{op_type}_{self._count}"
        outs = [n if n is not None else f"{node_name}/out{i}" for i, n in enumerate(names or [None] * outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def f32(self, value) -> str:
        return self.const(value, np.float32)


class Weights:
    """Stores each Hugging Face tensor in the variant's precision, records it in the weights table,
    and emits the ops that turn it back into a float32 operand."""

    def __init__(self, g: GraphBuilder, data: ExternalData, ckpt: Checkpoint, dims: Dims, precision: str,
                 profile: str, accuracy_level: int, jobs: TensorJobs, int4k_8bit: str = "auto",
                 imatrix: dict | None = None, int4k_wide: str = "q6k"):
        self.g, self.data, self.ckpt, self.dims = g, data, ckpt, dims
        self.int4k_8bit, self.int4k_wide = int4k_8bit, int4k_wide
        # Calibration statistics (imatrix.py) weighing int4k's search, by matrix name.
        self.imatrix = imatrix or {}
        self.precision, self.profile = precision, profile
        self.jobs = jobs
        # Profile gpu: float MatMulNBits (the accuracy level is a CPU setting; CUDA ignores it).
        self.accuracy_level = 0 if profile == "gpu" else accuracy_level
        # Element type of activations and of the parameters they meet.
        self.act = TensorProto.FLOAT16 if profile == "gpu" else TensorProto.FLOAT
        self.table: dict[str, dict] = {}
        self._stored: dict[str, str] = {}  # HF name -> how it was stored
        self._fused: dict[str, list[str]] = {}  # fused name -> the HF tensors it concatenates

    def _shape(self, name: str) -> tuple[int, ...]:
        """The shape the config gives the source tensor `name` (a fused one: its parts stacked)."""
        if name in self._fused:
            shapes = [expected_shape(part, self.dims) for part in self._fused[name]]
            return (sum(s[0] for s in shapes),) + shapes[0][1:]
        return expected_shape(name, self.dims)

    def _load(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name in self._fused:
            arr = np.concatenate([self.ckpt.tensors[part]() for part in self._fused[name]], axis=0)
        else:
            arr = self.ckpt.tensors[name]()
        if arr.shape != shape:
            raise ExportError(f"tensor {name}: shape {list(arr.shape)}, the model's config implies {list(shape)}")
        return arr.astype(np.float32, copy=False)

    def fused(self, name: str, parts: list[str]) -> str:
        """A tensor that is `parts` stacked along the output dimension (fused Q, K and V projections,
        their biases), stored under `name`. Quantization is per output row (int8) or per row and 32-block
        (int4), so each part's rows quantize exactly as they would alone."""
        self._fused[name] = parts
        return name

    def _slot(self, name: str, dtype, shape: tuple[int, ...]) -> dict:
        """Reserves `name` in the data file; returns its record for the weights table."""
        tensor, offset, nbytes = self.data.reserve(name, np.dtype(dtype), shape)
        self.g.initializers.append(tensor)
        return {"dtype": str(np.dtype(dtype)), "shape": list(shape), "offset": offset, "nbytes": nbytes}

    def _record(self, name: str, slot: dict, logical_shape: tuple[int, ...], quant: dict | None = None) -> None:
        self.table[name] = {"dtype": slot["dtype"], "shape": list(logical_shape), "transposed": False,
                            "offset": slot["offset"], "nbytes": slot["nbytes"], **({"quant": quant} if quant else {})}

    def _store(self, name: str, kind: str, source: str | None = None) -> None:
        """Stores tensor `source` (default `name`) as `kind` under `name`: its places in the data file and
        its table entry now, the load / quantize / write as a tensor job (the bytes land where they would
        whenever the job runs). Quantized tensors: the scales first, then the values."""
        source = source or name
        shape = self._shape(source)
        if kind == "int4k":
            self._store_int4k(name, source, shape)
            return
        if kind == "q6k":
            self._store_q6k(name, source, shape)
            return
        if kind in ("float32", "fp32", "fp16"):
            dtype = np.float16 if kind == "fp16" else np.float32
            slots = [self._slot(name, dtype, shape)]
            self._record(name, slots[0], shape)

            def convert(w):
                return [w.astype(dtype, copy=False)]
        else:
            n, k = shape
            bits, block, packed, quantize = {
                "int8": (8, k, None, quantize_int8_rows),
                "int8_blocks": (8, INT8_BLOCK, INT8_BLOCK, quantize_int8_blocks),
                "int4": (4, INT4_BLOCK, INT4_BLOCK // 2, quantize_int4_blocks),
            }[kind]
            blocks = -(-k // block)
            scale = self._slot(name + "_scale", np.float32, (n,) if kind == "int8" else (n, blocks))
            packed_shape = shape if packed is None else (n, blocks, packed)
            values = self._slot(name, np.int8 if kind == "int8" else np.uint8, packed_shape)
            quant = {"scheme": "symmetric", "bits": bits, "block_size": block, "axis": 1, "scale": scale}
            if kind == "int8_blocks":
                quant["zero_point"] = 128
            if packed is not None:
                quant["packed_shape"] = list(packed_shape)
            self._record(name, values, shape, quant)
            slots = [scale, values]

            def convert(w):
                q, scales = quantize(w)
                return [scales, q]
        self._stored[name] = kind

        def job():
            for slot, arr in zip(slots, convert(self._load(source, shape))):
                self.data.write(slot["offset"], arr)

        # Working set: the float32 source, once more while it is concatenated or dequantized, the stored
        # bytes, and the slab temporaries of the GGUF dequantizer and the quantizers.
        estimate = 8 * int(np.prod(shape, dtype=np.int64)) + sum(s["nbytes"] for s in slots) + (64 << 20)
        self.jobs.submit(estimate, job, f"tensor {source}")

    def _store_int4k(self, name: str, source: str, shape: tuple[int, ...]) -> None:
        """int4k (docs/bundle-format.md): a GGUF Q4_K tensor's blocks carried over as they are (the same
        nibbles, codes and super-block scales, rearranged), anything else quantized by `quantize_int4k`."""
        n, k = shape
        nb = -(-k // INT4_BLOCK)
        ns = -(-nb // KQ_SUPER)
        packed_shape = (n, nb, INT4_BLOCK // 2)
        slots = [self._slot(name, np.uint8, packed_shape), self._slot(name + "_codes", np.uint8, (n, ns, 12)),
                 self._slot(name + "_d", np.float16, (n, ns)), self._slot(name + "_dmin", np.float16, (n, ns))]
        quant = {"scheme": "kquant", "bits": 4, "block_size": INT4_BLOCK, "super_block": KQ_SUPER, "axis": 1,
                 "packed_shape": list(packed_shape), "codes": slots[1], "d": slots[2], "dmin": slots[3]}

        def stored(arrays):
            packed, sc, m, d, dmin = arrays
            return packed, pack_kquant_codes(sc, m), d, dmin

        self._store_k_quant(name, source, shape, "int4k", quant, slots,
                            ("Q4_K", int4k_from_q4_k), quantize_int4k, stored)

    def _store_q6k(self, name: str, source: str, shape: tuple[int, ...]) -> None:
        """q6k (docs/bundle-format.md): a GGUF Q6_K tensor's blocks carried over as they are (the same 6-bit
        values, scale codes and d, rearranged), anything else quantized by `quantize_q6k`."""
        n, k = shape
        nb = -(-k // INT4_BLOCK)
        ns = -(-(2 * nb) // Q6_SUPER)
        packed_shape = (n, nb, INT4_BLOCK // 2)
        slots = [self._slot(name, np.uint8, packed_shape), self._slot(name + "_qh", np.uint8, (n, nb, INT4_BLOCK // 4)),
                 self._slot(name + "_sc", np.int8, (n, 2 * nb)), self._slot(name + "_d", np.float16, (n, ns))]
        quant = {"scheme": "q6k", "bits": 6, "block_size": Q6_SUB, "super_block": Q6_SUPER, "axis": 1,
                 "packed_shape": list(packed_shape), "high": slots[1], "scale": slots[2], "d": slots[3]}
        self._store_k_quant(name, source, shape, "q6k", quant, slots, ("Q6_K", q6k_from_q6_k), quantize_q6k)

    def _store_k_quant(self, name: str, source: str, shape: tuple[int, ...], kind: str, quant: dict, slots: list,
                       carry: tuple, quantize, stored=lambda arrays: arrays) -> None:
        """Records a K-quant-class tensor (int4k, q6k; its first slot the table's entry) and submits its job:
        a GGUF tensor of type `carry[0]` converted by `carry[1]` from its raw blocks (no requantization),
        anything else `quantize(float weights, calibration columns)`; `stored` turns either's arrays into
        the slots' (in order)."""
        n, k = shape
        self._record(name, slots[0], shape, quant)
        self._stored[name] = kind
        gguf_type, from_blocks = carry
        carried = source not in self._fused and self.ckpt.gguf_types.get(source) == gguf_type
        columns = self.imatrix.get(source)
        if columns is not None and columns.shape != (k,):
            raise ExportError(f"imatrix: {source} has statistics for {columns.shape[0]} input columns, the "
                              f"matrix has {k} (statistics of another model?)")
        packed_shape = tuple(quant["packed_shape"])

        def job():
            if carried:
                arrays = from_blocks(self.ckpt.raw_blocks[source]())
                if arrays[0].shape != packed_shape:
                    raise ExportError(f"tensor {source}: {gguf_type} blocks of shape {list(arrays[0].shape)}, "
                                      f"the model's config implies {list(packed_shape)}")
            else:
                arrays = quantize(self._load(source, shape), columns)
            for slot, arr in zip(slots, stored(arrays)):
                self.data.write(slot["offset"], arr)

        estimate = 8 * n * k + sum(s["nbytes"] for s in slots) + (64 << 20)
        self.jobs.submit(estimate, job, f"tensor {source}")

    def computed(self, name: str, arr: np.ndarray) -> None:
        """A tensor the exporter computes (rotary tables), stored as it is."""
        slot = self._slot(name, arr.dtype, arr.shape)
        self._record(name, slot, arr.shape)
        self.data.write(slot["offset"], arr)

    def float32(self, name: str) -> str:
        """Norm weights and biases: always stored float32 (tiny, and precision-sensitive)."""
        if name not in self._stored:
            self._store(name, "float32")
        return name

    def float_linear(self, x: str, name: str) -> str:
        """x @ W^T with W stored float32 in every variant (a MoE router, a shared expert's gate: small, and
        routing decisions are sensitive to them) and `x` float32."""
        self.float32(name)
        if self.profile == "portable":
            return self.g.op("Gemm", [x, name], transB=1)
        return self.g.op("FusedMatMul", [x, name], domain=MS_DOMAIN, transB=1)

    def activation_typed(self, stored: str) -> str:
        """A float32 tensor (stored, or computed) as an operand of the activations' type."""
        return stored if self.act == TensorProto.FLOAT else self.g.op("Cast", [stored], to=self.act)

    def param(self, name: str) -> str:
        """A norm weight or bias, typed like the activations."""
        return self.activation_typed(self.float32(name))

    def _matrix_kind(self, name: str) -> str:
        if self.precision in ("fp32", "fp16"):
            return self.precision
        if self.precision == "int8" and self.profile == "ort":
            # Every matrix, the embedding included, in 8-bit MatMulNBits blocks: one tensor serves both
            # the embedding's Gather and a tied head's product (ONNX Runtime folds an int8 DequantizeLinear
            # + Gemm into float32 at load, 4x the bytes read per token).
            return "int8_blocks"
        big = name == "model.embed_tokens.weight" or (name == "lm_head.weight" and self.profile == "portable")
        if self.precision == "int4k" and not big:
            if not self._sensitive(name):
                return "int4k"
            # A GGUF's 8-bit tensors stay 8-bit: brought to 6 bits, the demo model's Q8_0 value
            # projections cost perplexity 6.830 -> 6.867 (int8 per row keeps nearly all they hold).
            return "int8" if self.ckpt.gguf_types.get(name) in EIGHT_BIT_GGUF_TYPES else self.int4k_wide
        return "int8" if (self.precision == "int8" or big) else "int4"

    def _sensitive(self, name: str) -> bool:
        """Whether int4k keeps `name` wide (6 or 8 bits). From a quantized GGUF tensor: where its producer spent more
        than 5 bits per weight (Q4_K_M's Q6_K tensors, and their Q8_0 stand-ins where a row is not a multiple
        of 256). Otherwise (float sources) Q4_K_M's choice: the value projections and the down projections of
        the first and last eighth of the layers and of every third layer between."""
        if self.int4k_8bit == "none" or (self.int4k_8bit == "attn-v" and ".self_attn.v_proj." not in name):
            return False
        gguf_type = self.ckpt.gguf_types.get(name)
        if gguf_type is not None and gguf_type not in FLOAT_GGUF_TYPES:
            return gguf_type in WIDE_GGUF_TYPES
        m = re.match(r"model\.layers\.(\d+)\.(self_attn\.v_proj|mlp\.down_proj)\.weight$", name)
        if not m:
            return False
        i, n = int(m.group(1)), self.dims.layers
        return i < n // 8 or i >= n - n // 8 or (i - n // 8) % 3 == 2

    def _store_matrix(self, name: str) -> str:
        if name not in self._stored:
            self._store(name, self._matrix_kind(name))
        return self._stored[name]

    def dense(self, name: str) -> str:
        """The weight as a float32 [out, in] operand (dequantized in the graph)."""
        g = self.g
        kind = self._store_matrix(name)
        if kind == "fp32":
            return name
        if kind == "fp16":
            return name if self.act == TensorProto.FLOAT16 else g.op("Cast", [name], to=TensorProto.FLOAT)
        if kind == "int8":
            return g.op("DequantizeLinear", [name, name + "_scale"], axis=0)
        if kind == "int4k":
            return self._dense_int4k(name)
        if kind == "q6k":
            return self._dense_q6k(name)
        if kind != "int4":
            raise ValueError(f"{name}: {kind} weights are multiplied by MatMulNBits only")
        n, k = self.table[name]["shape"]
        blocks = self.table[name]["quant"]["packed_shape"][1]
        q = self._nibbles(name, n, blocks)
        w = g.op("Mul", [g.op("Sub", [q, g.f32(8.0)]), g.op("Unsqueeze", [name + "_scale", g.i64([-1])])])
        w = g.op("Reshape", [w, g.i64([n, blocks * INT4_BLOCK])])
        if blocks * INT4_BLOCK != k:
            w = g.op("Slice", [w, g.i64([0]), g.i64([k]), g.i64([1])])
        return w

    def _nibbles(self, name: str, n: int, blocks: int) -> str:
        """Packed nibbles uint8 [n, blocks, 16] as float32 [n, blocks, 32] (low nibble first), in float
        arithmetic so every runtime has the ops."""
        g = self.g
        p = g.op("Cast", [name], to=TensorProto.FLOAT)
        hi = g.op("Floor", [g.op("Div", [p, g.f32(16.0)])])
        lo = g.op("Sub", [p, g.op("Mul", [hi, g.f32(16.0)])])
        pairs = g.op("Concat", [g.op("Unsqueeze", [lo, g.i64([-1])]), g.op("Unsqueeze", [hi, g.i64([-1])])], axis=-1)
        return g.op("Reshape", [pairs, g.i64([n, blocks, INT4_BLOCK])])

    def _dense_int4k(self, name: str) -> str:
        """An int4k weight dequantized in the graph: d*sc*q - dmin*m per sub-block."""
        g = self.g
        n, k = self.table[name]["shape"]
        blocks = self.table[name]["quant"]["packed_shape"][1]

        def per_sub_block(codes: str, scale: str) -> str:
            # The super-block scale repeated for its sub-blocks ([n, ns] -> [n, blocks]) times the codes.
            rep = g.op("Expand", [g.op("Unsqueeze", [g.op("Cast", [scale], to=TensorProto.FLOAT), g.i64([-1])]),
                                  g.i64([1, 1, KQ_SUPER])])
            rep = g.op("Slice", [g.op("Reshape", [rep, g.i64([n, -1])]), g.i64([0]), g.i64([blocks]), g.i64([1])])
            return g.op("Unsqueeze", [g.op("Mul", [rep, codes]), g.i64([-1])])

        sc, m = self._kquant_codes(name, n, blocks)
        step = per_sub_block(sc, name + "_d")
        low = per_sub_block(m, name + "_dmin")
        w = g.op("Sub", [g.op("Mul", [self._nibbles(name, n, blocks), step]), low])
        w = g.op("Reshape", [w, g.i64([n, blocks * INT4_BLOCK])])
        if blocks * INT4_BLOCK != k:
            w = g.op("Slice", [w, g.i64([0]), g.i64([k]), g.i64([1])])
        return w

    def _kquant_codes(self, name: str, n: int, blocks: int) -> tuple[str, str]:
        """int4k's packed super-block codes uint8 [n, ns, 12] (GGUF Q4_K's packing, quantize.unpack_kquant_codes)
        as the scale and min codes, float32 [n, blocks], in float arithmetic."""
        g = self.g
        c = g.op("Cast", [name + "_codes"], to=TensorProto.FLOAT)

        def part(lo: int, hi: int) -> str:
            return g.op("Slice", [c, g.i64([lo]), g.i64([hi]), g.i64([-1])])

        def split(v: str, at: float) -> tuple[str, str]:
            """(v mod at, floor(v / at)) of non-negative integers."""
            above = g.op("Floor", [g.op("Div", [v, g.f32(at)])])
            return g.op("Sub", [v, g.op("Mul", [above, g.f32(at)])]), above

        (sc_low, sc_top), (m_low, m_top) = split(part(0, 4), 64.0), split(part(4, 8), 64.0)
        nib_low, nib_high = split(part(8, 12), 16.0)
        sc_rest = g.op("Add", [nib_low, g.op("Mul", [sc_top, g.f32(16.0)])])
        m_rest = g.op("Add", [nib_high, g.op("Mul", [m_top, g.f32(16.0)])])

        def codes(first: str, rest: str) -> str:
            both = g.op("Reshape", [g.op("Concat", [first, rest], axis=-1), g.i64([n, -1])])
            return g.op("Slice", [both, g.i64([0]), g.i64([blocks]), g.i64([1])])

        return codes(sc_low, sc_rest), codes(m_low, m_rest)

    def _dense_q6k(self, name: str) -> str:
        """A q6k weight dequantized in the graph: d*sc*(u - 32) per sub-block of 16, u = low + 16*high."""
        g = self.g
        n, k = self.table[name]["shape"]
        blocks = self.table[name]["quant"]["packed_shape"][1]
        # The top bits [n, blocks, 8] as [n, blocks, 32]: element 4j + i in bits 2i..2i+2 of byte j.
        rest = g.op("Cast", [name + "_qh"], to=TensorProto.FLOAT)
        parts = []
        for _ in range(4):
            above = g.op("Floor", [g.op("Div", [rest, g.f32(4.0)])])
            parts.append(g.op("Unsqueeze", [g.op("Sub", [rest, g.op("Mul", [above, g.f32(4.0)])]), g.i64([-1])]))
            rest = above
        high = g.op("Reshape", [g.op("Concat", parts, axis=-1), g.i64([n, blocks, INT4_BLOCK])])
        u = g.op("Add", [self._nibbles(name, n, blocks), g.op("Mul", [high, g.f32(16.0)])])
        values = g.op("Reshape", [g.op("Sub", [u, g.f32(32.0)]), g.i64([n, 2 * blocks, Q6_SUB])])
        # The super-block scale repeated for its sub-blocks ([n, ns] -> [n, 2 blocks]) times the codes.
        rep = g.op("Expand", [g.op("Unsqueeze", [g.op("Cast", [name + "_d"], to=TensorProto.FLOAT), g.i64([-1])]),
                              g.i64([1, 1, Q6_SUPER])])
        rep = g.op("Slice", [g.op("Reshape", [rep, g.i64([n, -1])]), g.i64([0]), g.i64([2 * blocks]), g.i64([1])])
        step = g.op("Mul", [rep, g.op("Cast", [name + "_sc"], to=TensorProto.FLOAT)])
        w = g.op("Mul", [values, g.op("Unsqueeze", [step, g.i64([-1])])])
        w = g.op("Reshape", [w, g.i64([n, blocks * INT4_BLOCK])])
        if blocks * INT4_BLOCK != k:
            w = g.op("Slice", [w, g.i64([0]), g.i64([k]), g.i64([1])])
        return w

    def linear(self, x: str, name: str, bias: str | None = None, out: str | None = None) -> str:
        """x @ W^T (+ bias); `out` names the result (else a fresh name)."""
        g = self.g
        kind = self._store_matrix(name)
        if self.profile == "portable":
            inputs = [x, self.dense(name)] + ([self.param(bias)] if bias else [])
            return g.op("Gemm", inputs, transB=1, names=[out])
        if kind in ("int4", "int8_blocks"):
            y = self._matmul_nbits(x, name, None if bias else out)
        else:
            # 3-D activations: FusedMatMul multiplies by the [out, in] weight transposed, as Gemm does in 2-D.
            y = g.op("FusedMatMul", [x, self.dense(name)], domain=MS_DOMAIN, transB=1, names=[None if bias else out])
        return g.op("Add", [y, self.param(bias)], names=[out]) if bias else y

    def _matmul_nbits(self, x: str, stored: str, out: str | None = None) -> str:
        n, k = self.table[stored]["shape"]
        quant = self.table[stored]["quant"]
        # The scales are MatMulNBits' T1, the activations' type.
        scales = self.activation_typed(stored + "_scale")
        return self.g.op("MatMulNBits", [x, stored, scales], domain=MS_DOMAIN, K=k, N=n, names=[out],
                         bits=quant["bits"], block_size=quant["block_size"], accuracy_level=self.accuracy_level)

    def embed(self, ids: str) -> str:
        """Rows of the embedding for `ids` (any shape; the rows get one more axis, of `hidden`), float32."""
        g = self.g
        name = "model.embed_tokens.weight"
        kind = self._store_matrix(name)
        rows = g.op("Gather", [name, ids], axis=0)
        if kind == "fp32":
            return rows
        if kind == "fp16":
            return g.op("Cast", [rows], to=TensorProto.FLOAT)
        scale = g.op("Unsqueeze", [g.op("Gather", [name + "_scale", ids], axis=0), g.i64([-1])])
        if kind == "int8_blocks":
            # rows [B, S, n_blocks, block] of u = q + 128, scales [B, S, n_blocks, 1] (profile ort: 2-D ids)
            _, k = self.table[name]["shape"]
            _, blocks, block = self.table[name]["quant"]["packed_shape"]
            q = g.op("Sub", [g.op("Cast", [rows], to=TensorProto.FLOAT), g.f32(128.0)])
            w = g.op("Reshape", [g.op("Mul", [q, scale]), g.i64([0, 0, blocks * block])])
            return w if blocks * block == k else g.op("Slice", [w, g.i64([0]), g.i64([k]), g.i64([-1])])
        return g.op("Mul", [g.op("Cast", [rows], to=TensorProto.FLOAT), scale])

    def lm_head(self, x: str, out: str | None = None) -> str:
        if self.precision == "int4" and self.profile != "portable":
            return self._matmul_nbits(x, self._int4_head(), out)
        if self.precision == "int8" and self.profile == "ort" and self.ckpt.tied:
            # The embedding's 8-bit blocks are the head's MatMulNBits weight as they are.
            self._store_matrix("model.embed_tokens.weight")
            return self._matmul_nbits(x, "model.embed_tokens.weight", out)
        head = "model.embed_tokens.weight" if self.ckpt.tied else "lm_head.weight"
        return self.linear(x, head, out=out)

    def _int4_head(self) -> str:
        """The int4 LM head of an ort int4 variant: ONNX Runtime folds an int8 DequantizeLinear + Gemm head
        into a float32 matrix (544 MB for the 0.5B model, read every token), MatMulNBits keeps it 4-bit.
        A tied head gets its own int4 copy of the embedding (`TIED_INT4_HEAD`, not a model parameter:
        `lm_head.weight` stays absent, the table's sign of a tied head); the embedding stays int8 for Gather."""
        if not self.ckpt.tied:
            self._store_matrix("lm_head.weight")
            return "lm_head.weight"
        name = TIED_INT4_HEAD
        if name not in self._stored:
            self._store(name, "int4", source="model.embed_tokens.weight")
        return name


def _rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    var = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.f32(eps)])])])
    return g.op("Mul", [weight, g.op("Mul", [x, inv])])


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    x1 = g.op("Slice", [x, g.i64([0]), g.i64([half]), g.i64([-1])])
    x2 = g.op("Slice", [x, g.i64([half]), g.i64([2 * half]), g.i64([-1])])
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def build_variant(ckpt: Checkpoint, dims: Dims, precision: str, profile: str, out_dir: Path, progress=None,
                  accuracy_level: int = ORT_CPU_ACCURACY_LEVEL, jobs: TensorJobs | None = None,
                  int4k_8bit: str = "auto", imatrix: dict | None = None, int4k_wide: str = "q6k") -> dict:
    """Write onnx/<variant>/model.onnx(+.data) under out_dir; return the variant's bundle.json entry.
    `jobs` runs the tensors' loads and quantizers (default: each as the graph reaches it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ExternalData(out_dir / "model.onnx.data")
    g = GraphBuilder()
    jobs = jobs or TensorJobs()
    w = Weights(g, data, ckpt, dims, precision, profile, accuracy_level, jobs, int4k_8bit, imatrix, int4k_wide)
    try:
        model = _build(g, w, ckpt, dims, profile, progress)
    finally:
        try:
            jobs.wait()  # every tensor written (or the first failure raised) before the file closes
        finally:
            data.close()
    onnx.save_model(model, str(out_dir / "model.onnx"))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    entry = {
        "precision": precision,
        "profile": profile,
        "opset": OPSET,
        "kv_dtype": "float16" if profile == "gpu" else "float32",
        "inputs": inputs,
        "outputs": outputs,
        "weights": w.table,
    }
    if precision in ("int4", "int8") and profile != "portable":
        entry["accuracy_level"] = w.accuracy_level
    if precision == "int4k":
        entry["int4k_8bit"] = int4k_8bit
        entry["int4k_wide"] = int4k_wide
        entry["int4k_calibrated"] = bool(imatrix)
    if profile != "portable":
        entry[PADDED_MASK] = True
    return entry


def _build(g: GraphBuilder, w: Weights, ckpt: Checkpoint, dims: Dims, profile: str, progress) -> onnx.ModelProto:
    nh, kvh, hd = dims.heads, dims.kv_heads, dims.head_dim
    n_rep = nh // kvh
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    logits_seq = "seq" if profile == "portable" else "logits_seq"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", logits_seq, dims.vocab])]
    for i in range(dims.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", w.act, ["batch", kvh, "past_seq", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", w.act, ["batch", kvh, "total_seq", hd]))
    if profile != "portable":
        inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))

    ids_shape = g.op("Shape", ["input_ids"])
    seq = g.op("Slice", [ids_shape, g.i64([1]), g.i64([2])])
    inv_freq, rope_scale = rotary_inv_freq(ckpt.config, dims)

    if profile == "portable":
        batch = g.op("Slice", [ids_shape, g.i64([0]), g.i64([1])])
        h = w.embed(g.op("Reshape", ["input_ids", g.i64([-1])]))
        heads_shape = {n: g.op("Concat", [ids_shape, g.i64([n, hd])], axis=0) for n in {nh, kvh}}
        grouped = g.op("Concat", [batch, g.i64([kvh, n_rep]), seq, g.i64([hd])], axis=0)
        merged = g.op("Concat", [batch, g.i64([nh]), seq, g.i64([hd])], axis=0)
        cos, sin = _rotary_tables(g, inv_freq, rope_scale)
        mask = _attention_mask(g, ids_shape)
    else:
        h = w.embed("input_ids")
        seqlens_k, total_len = _gqa_lengths(g)
        cos_cache, sin_cache = (w.activation_typed(t) for t in _rotary_cache(
            g, w, inv_freq, rope_scale, int(ckpt.config["max_position_embeddings"])))

    layers = range(dims.layers)
    if progress is not None:
        layers = progress(layers, desc="layers", unit="layer", leave=False)
    # The first norm in float32 (the embedding rows are float32 in every variant), then the activations' type.
    x = _rms_norm(g, h, w.float32("model.layers.0.input_layernorm.weight"), dims.eps)
    x, h = w.activation_typed(x), w.activation_typed(h)
    for i in layers:
        p = f"model.layers.{i}."
        if profile == "portable":
            q = w.linear(x, p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias")
            k = w.linear(x, p + "self_attn.k_proj.weight", p + "self_attn.k_proj.bias")
            v = w.linear(x, p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias")
        else:
            # One product for Q, K and V (as ONNX Runtime GenAI's builder does): two fewer operators per
            # layer, and GroupQueryAttention takes the packed result as it is.
            parts = ("q_proj", "k_proj", "v_proj")
            qkv = w.linear(
                x,
                w.fused(p + FUSED_QKV + ".weight", [f"{p}self_attn.{t}.weight" for t in parts]),
                w.fused(p + FUSED_QKV + ".bias", [f"{p}self_attn.{t}.bias" for t in parts]),
            )
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        if profile == "portable":
            def heads(t, n):
                return g.op("Transpose", [g.op("Reshape", [t, heads_shape[n]])], perm=[0, 2, 1, 3])

            q4 = _rotate(g, heads(q, nh), cos, sin, hd // 2)
            k4 = _rotate(g, heads(k, kvh), cos, sin, hd // 2)
            g.op("Concat", [past_k, k4], names=[present_k], axis=2)
            g.op("Concat", [past_v, heads(v, kvh)], names=[present_v], axis=2)
            # Query heads grouped under their shared kv head: [B, kvh, n_rep, S, hd] against [B, kvh, 1, T, hd]
            # by broadcasting MatMul, so the cache is never repeated in memory.
            qg = g.op("Reshape", [q4, grouped])
            kt = g.op("Transpose", [g.op("Unsqueeze", [present_k, g.i64([2])])], perm=[0, 1, 2, 4, 3])
            scores = g.op("Mul", [g.op("MatMul", [qg, kt]), g.f32(1.0 / np.sqrt(hd))])
            scores = g.op("Where", [mask, scores, g.f32(NEG_INF)])
            probs = g.op("Softmax", [scores], axis=-1)
            ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [present_v, g.i64([2])])])
            ctx = g.op("Transpose", [g.op("Reshape", [ctx, merged])], perm=[0, 2, 1, 3])
            ctx = g.op("Reshape", [ctx, g.i64([-1, nh * hd])])
        else:
            ctx = g.op(
                "GroupQueryAttention",
                [qkv, "", "", past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache],
                names=[f"attn_{i}", present_k, present_v], domain=MS_DOMAIN,
                num_heads=nh, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0, scale=float(1.0 / np.sqrt(hd)),
            )[0]
        o = w.linear(ctx, p + "self_attn.o_proj.weight")
        x, h = _add_and_norm(g, w, profile, o, h, p + "post_attention_layernorm.weight", dims.eps)
        if dims.moe and dims.moe.sparse(i):
            down = _sparse_mlp(g, w, x, p + "mlp.", dims.moe)
        else:
            down = _mlp(g, w, x, p + "mlp.")
        next_norm = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < dims.layers else "model.norm.weight"
        x, h = _add_and_norm(g, w, profile, down, h, next_norm, dims.eps)

    if profile != "portable":
        # Only the last `logits_to_keep` positions of each sequence reach the LM head: generation needs
        # one row, and a prompt's other rows would cost a head product each (issue 4's note: int4-ort
        # prefill 89 -> 117 tokens/s without them). Perplexity asks for all of them.
        keep = g.op("Min", [LOGITS_TO_KEEP, seq])
        rows = g.op("Slice", [x, g.op("Sub", [seq, keep]), seq, g.i64([1])])
        if profile == "gpu":
            g.op("Cast", [w.lm_head(rows)], to=TensorProto.FLOAT, names=["logits"])
        else:
            w.lm_head(rows, out="logits")
    else:
        logits = w.lm_head(x)
        g.op("Reshape", [logits, g.op("Concat", [ids_shape, g.i64([dims.vocab])], axis=0)], names=["logits"])

    graph = helper.make_graph(g.nodes, "qwen2_decoder_with_past", inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    if profile != "portable":
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="qwen2_export")
    model.ir_version = 8
    return model


def _mlp(g: GraphBuilder, w: Weights, x: str, prefix: str) -> str:
    """down(silu(gate(x)) * up(x)), the matrices under `prefix`."""
    gate = w.linear(x, prefix + "gate_proj.weight")
    up = w.linear(x, prefix + "up_proj.weight")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return w.linear(act, prefix + "down_proj.weight")


def _sparse_mlp(g: GraphBuilder, w: Weights, x: str, prefix: str, moe) -> str:
    """Qwen2-MoE's sparse MLP (transformers' Qwen2MoeSparseMoeBlock): router softmax in float32, the top k
    experts' outputs weighted by their probabilities (renormalized if `norm_topk_prob`) and summed in expert
    order, plus the shared expert times sigmoid(shared_expert_gate(x)).

    Computed densely: every expert runs on every token and is weighted by its routing weight, zero unless
    it is among the token's top k. That is E / k times the expert arithmetic of the native backend, which
    runs only the selected experts: standard ONNX has no operator that runs a subgraph on a data-dependent
    subset of rows (short of a Loop or If per expert, which tract does not run), and the zero weights
    leave the sum exactly what the selected experts give."""
    x32 = x if w.act == TensorProto.FLOAT else g.op("Cast", [x], to=TensorProto.FLOAT)
    probs = g.op("Softmax", [w.float_linear(x32, prefix + "gate.weight")], axis=-1)
    top, index = g.op("TopK", [probs, g.i64([moe.top_k])], outputs=2, axis=-1, largest=1, sorted=1)
    if moe.norm_topk_prob:
        top = g.op("Div", [top, g.op("ReduceSum", [top, g.i64([-1])], keepdims=1)])
    zeros = g.op("ConstantOfShape", [g.op("Shape", [probs])],
                  value=onnx.helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    weights = w.activation_typed(g.op("ScatterElements", [zeros, index, top], axis=-1))
    out = None
    for e in range(moe.experts):
        weight = g.op("Slice", [weights, g.i64([e]), g.i64([e + 1]), g.i64([-1])])
        term = g.op("Mul", [_mlp(g, w, x, f"{prefix}experts.{e}."), weight])
        out = term if out is None else g.op("Add", [out, term])
    shared_gate = g.op("Sigmoid", [w.float_linear(x32, prefix + "shared_expert_gate.weight")])
    shared = g.op("Mul", [_mlp(g, w, x, prefix + "shared_expert."), w.activation_typed(shared_gate)])
    return g.op("Add", [out, shared])


def _add_and_norm(g, w, profile, delta, h, norm_weight, eps):
    """Residual add, then RMSNorm of the sum; returns (normed, new residual)."""
    weight = w.param(norm_weight)
    if profile != "portable":
        # The mean and inverse deviation outputs left out: nothing reads them.
        normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [delta, h, weight], names=[None, "", "", None],
                                   domain=MS_DOMAIN, epsilon=eps)
        return normed, total
    total = g.op("Add", [h, delta])
    return _rms_norm(g, total, weight, eps), total


def _rotary_tables(g: GraphBuilder, inv_freq: np.ndarray, scale: float):
    """cos/sin [B, 1, S, head_dim] from position_ids, as transformers' Qwen2RotaryEmbedding computes them."""
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), g.i64([2])])
    freqs = g.op("Mul", [pos, g.f32(inv_freq)])
    emb = g.op("Concat", [freqs, freqs], axis=-1)
    tables = []
    for fn in ("Cos", "Sin"):
        t = g.op(fn, [emb])
        if scale != 1.0:
            t = g.op("Mul", [t, g.f32(scale)])
        tables.append(g.op("Unsqueeze", [t, g.i64([1])]))
    return tables


def _attention_mask(g: GraphBuilder, ids_shape: str) -> str:
    """Boolean [B, 1, 1, S, T]: key j is visible to query i when j <= past + i and the mask allows j.
    Built from Range + comparison (not Trilu with a computed k, which tract rejects)."""
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.i64(1)], axis=0)
    seq = g.op("Gather", [ids_shape, g.i64(1)], axis=0)
    past = g.op("Sub", [total, seq])
    key_pos = g.op("Range", [g.i64(0), total, g.i64(1)])
    query_pos = g.op("Range", [past, total, g.i64(1)])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_pos, g.i64([0])]), g.op("Unsqueeze", [query_pos, g.i64([1])])])
    padding = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.i64([1, 2, 3])])], to=TensorProto.BOOL)
    return g.op("And", [causal, padding])


def _gqa_lengths(g: GraphBuilder):
    """GroupQueryAttention's seqlens_k (valid length - 1 per row) and total_sequence_length, both from the
    mask's sums: so the mask may be wider than the sequence, zero-padded on the right (`PADDED_MASK`)."""
    valid = g.op("ReduceSum", ["attention_mask", g.i64([1])], keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [valid, g.i64(1)])], to=TensorProto.INT32)
    total = g.op("ReduceMax", [valid], keepdims=0)
    return seqlens_k, g.op("Cast", [total], to=TensorProto.INT32)


def _rotary_cache(g: GraphBuilder, w: Weights, inv_freq: np.ndarray, scale: float, max_pos: int):
    positions = np.arange(max_pos, dtype=np.float32)[:, None]
    freqs = positions * inv_freq[None, :]
    names = []
    for name, fn in (("rotary.cos_cache", np.cos), ("rotary.sin_cache", np.sin)):
        w.computed(name, (fn(freqs) * np.float32(scale)).astype(np.float32))
        names.append(name)
    return names
