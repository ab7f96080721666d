"""exp for kernels' inner loops, in plain arithmetic so LLVM vectorises the loop around it.

numba lowers `np.exp`/`np.tanh` on float32 to scalar libm calls (no vector math library here), which
keeps softmax, cross-entropy and GELU at one element per call. `exp_nonpositive` is Cody-Waite range
reduction, exp(x) = 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln(2)/2, a degree-7 Taylor polynomial
for exp(r) (truncation error (ln2/2)^8 / 8! ~ 6e-9) in Horner form with explicit fused multiply-adds (`fma`:
one rounding per step, and the same result on every CPU), and 2^n built directly from its exponent bits.
Measured against float64 exp over [-87, 0]: at most 0.91 ulp (float32 libm expf: 0.5-1 ulp).

`Lanes` (below) hold 16 values in one SIMD vector, for reductions in a fixed, written order: the kernels
are compiled without fast math (compile.py), so this is how their sums vectorise.
"""

import operator

import llvmlite.ir as llvm_ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

LOG2_E = 1.4426950408889634
# ln 2 split in two: LN2_HIGH has its low mantissa bits zero, so n * LN2_HIGH is exact for |n| <= 512
LN2_HIGH = 0.693145751953125
LN2_LOW = 1.428606765330187e-06
# below this exp underflows to denormals; clamped so 2^n keeps a normal exponent
EXP_LOWEST = -87.0

LANES = 16  # values per Lanes (see the lanes section below)
_FLOATS = (types.float32, types.float64)
_I32 = llvm_ir.IntType(32)


class Lanes(types.Type):
    """numba type of LANES float32 or float64 values in one vector register (or a few)."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"Lanes{LANES}({dtype})")


@register_model(Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, llvm_ir.VectorType(element, LANES))


@intrinsic
def pow2_of_integer(typingctx, n):
    """2^n for a float32 `n` (a scalar or Lanes) holding an integer in [-126, 127], from its exponent bits (an
    integer add, shift and bit reinterpretation, which vectorise, unlike ldexp)."""
    if _element(n) != types.float32:
        return None

    def codegen(context, builder, signature, args):
        value_type = args[0].type
        int_type = _I32 if not isinstance(value_type, llvm_ir.VectorType) else llvm_ir.VectorType(_I32, LANES)
        constant = lambda c: _splat(builder, llvm_ir.Constant(_I32, c), int_type)
        exponent = builder.add(builder.fptosi(args[0], int_type), constant(127))
        return builder.bitcast(builder.shl(exponent, constant(23)), value_type)

    return n(n), codegen


@intrinsic
def floor_of(typingctx, x):
    """floor(x) of a float32/float64 scalar or Lanes (LLVM's llvm.floor: exact, one instruction per vector)."""
    if _element(x) not in _FLOATS:
        return None

    def codegen(context, builder, signature, args):
        return builder.call(_llvm_function(builder, "floor", args[0].type, 1), args)

    return x(x), codegen


@intrinsic
def maximum_of(typingctx, x, floor):
    """np.maximum(x, floor) of a float32/float64 scalar or Lanes x and a scalar `floor` of its dtype: floor
    where floor > x, else x, so a NaN x stays NaN (floor is never NaN). A maximum is exact."""
    if not (_element(x) in _FLOATS and floor == _element(x)):
        return None

    def codegen(context, builder, signature, args):
        bound = _splat(builder, args[1], args[0].type)
        return builder.select(builder.fcmp_ordered(">", bound, args[0]), bound, args[0])

    return x(x, floor), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (IEEE fusedMultiplyAdd, LLVM's llvm.fma), for float32/float64 scalars or
    Lanes of one dtype (scalars beside Lanes are broadcast to every lane). Written explicitly, it gives the
    same result on every CPU: one FMA instruction on x86-64 since Haswell/Zen (AVX2 and AVX-512 alike), a
    correctly rounded library call on a CPU without one. Kernels are compiled without `contract`, so LLVM
    never fuses `a * b + c` itself."""
    element = _element(a)
    if not (element in _FLOATS and _element(b) == _element(c) == element):
        return None
    result = next((t for t in (a, b, c) if isinstance(t, Lanes)), a)

    def codegen(context, builder, signature, args):
        value_type = context.get_value_type(result)
        operands = [_splat(builder, arg, value_type) for arg in args]
        return builder.call(_llvm_function(builder, "fma", value_type, 3), operands)

    return result(a, b, c), codegen


def _element(t):
    """The float type of a scalar type or of Lanes."""
    return t.dtype if isinstance(t, Lanes) else t


def _splat(builder, value, value_type):
    """`value` (a scalar) in every lane when value_type is a vector and value is not one, else itself."""
    if not isinstance(value_type, llvm_ir.VectorType) or isinstance(value.type, llvm_ir.VectorType):
        return value
    undef = llvm_ir.Constant(value_type, llvm_ir.Undefined)
    one = builder.insert_element(undef, value, llvm_ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, _mask([0] * LANES))


def _llvm_function(builder, name, value_type, arity):
    """LLVM's intrinsic llvm.NAME (floor, fma) for value_type: a float, a double or a vector of LANES of them."""
    element = value_type.element if isinstance(value_type, llvm_ir.VectorType) else value_type
    width = 32 if isinstance(element, llvm_ir.FloatType) else 64
    suffix = f"v{LANES}f{width}" if isinstance(value_type, llvm_ir.VectorType) else f"f{width}"
    return cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(value_type, [value_type] * arity),
                                          f"llvm.{name}.{suffix}")


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def exp_nonpositive(x):
    """exp(x) for float32 x <= 0, a scalar or Lanes (lane-wise, the same bits as the scalar): x < -87 gives
    exp(-87) ~ 1.6e-38; NaN stays NaN."""
    x = maximum_of(x, np.float32(EXP_LOWEST))
    n = floor_of(fma(x, np.float32(LOG2_E), np.float32(0.5)))
    r = fma(n, np.float32(-LN2_HIGH), x)  # n * LN2_HIGH is exact: this is x - n * LN2_HIGH
    r = fma(n, np.float32(-LN2_LOW), r)
    p = fma(r, np.float32(1.0 / 5040.0), np.float32(1.0 / 720.0))
    p = fma(p, r, np.float32(1.0 / 120.0))
    p = fma(p, r, np.float32(1.0 / 24.0))
    p = fma(p, r, np.float32(1.0 / 6.0))
    p = fma(p, r, np.float32(0.5))
    p = fma(p, r, np.float32(1.0))
    p = fma(p, r, np.float32(1.0))
    return p * pow2_of_integer(n)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def tanh_float32(u):
    """tanh(u) for float32 u through exp_nonpositive: sign(u) (1 - e) / (1 + e), e = exp(-2|u|)."""
    e = exp_nonpositive(np.float32(-2.0) * np.abs(u))
    return np.float32(np.copysign((np.float32(1.0) - e) / (np.float32(1.0) + e), u))


# ------------------------------------------------------------------------------------------------ lanes
# Reductions in a fixed order. The kernels are compiled without fast math (compile.py), so LLVM may not
# reorder a `total += x[i]` loop into SIMD partial sums, and left alone such a loop runs one element at a
# time. Instead the kernels sum through `Lanes`: LANES values held as one LLVM <16 x float> (or double)
# vector, whose element-wise IEEE adds, subtracts, multiplies and maxima LLVM maps onto whatever
# registers the CPU has (two AVX2 ymm, one AVX-512 zmm, four SSE xmm) without changing any result.
#
# The documented order of a lane reduction of x[0:n] (`lane_sum`, `lane_dot`, and the kernels' loops):
#   1. lane j (0 <= j < 16) accumulates x[j], x[16 + j], x[32 + j], ... over the n // 16 full groups of
#      16, left to right, starting from 0 (for a dot product each term is the product a[i] * b[i], rounded
#      before the add: there is no fused multiply-add);
#   2. the lanes are combined by halving: lane j += lane j + 8 (j < 8), then j += j + 4 (j < 4),
#      j += j + 2 (j < 2), j += j + 1, leaving the result in lane 0;
#   3. the n % 16 leftover elements x[n - n % 16:] are added to it left to right.
# Every step is written in the source, so the result is the same on any CPU and in either kernel variant.
# (attention's hs = 64 path writes lane_dot out with the query's four Lanes held in registers: same order.)
#
# Operations: lanes_fill, lanes_load, lanes_store; `+`, `-`, `*` of two Lanes (IEEE, lane-wise, never fused);
# lanes_max; lanes_head; fma, floor_of, maximum_of and exp_nonpositive (lane-wise, the scalars' bits);
# lanes_float64; lanes_sum and lanes_reduce_max (step 2); lane_sum, lane_dot, lane_max (steps 1-3 over a
# whole array).


def _mask(indices):
    return llvm_ir.Constant(llvm_ir.VectorType(_I32, len(indices)), list(indices))


@intrinsic
def lanes_fill(typingctx, value):
    """Lanes all equal to `value` (a float32 or float64 scalar; the lanes take its type)."""
    if value not in _FLOATS:
        return None

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(signature.return_type)
        undef = llvm_ir.Constant(vector_type, llvm_ir.Undefined)
        one = builder.insert_element(undef, args[0], llvm_ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, undef, _mask([0] * LANES))

    return Lanes(value)(value), codegen


def _element_pointers(context, builder, array_type, array, start):
    """Pointers to array[start + j], j < LANES, of a 1-D array of any layout (no bounds check)."""
    shape = cgutils.unpack_tuple(builder, array.shape)
    strides = cgutils.unpack_tuple(builder, array.strides)
    return [cgutils.get_item_pointer2(context, builder, array.data, shape, strides, array_type.layout,
                                      [builder.add(start, llvm_ir.Constant(start.type, j))], wraparound=False)
            for j in range(LANES)]


def _check_array(array, start):
    return (isinstance(array, types.Array) and array.ndim == 1 and array.dtype in _FLOATS
            and isinstance(start, types.Integer))


@intrinsic
def lanes_load(typingctx, array, start):
    """Lanes j = array[start + j] for a 1-D float32/float64 array; start + LANES <= len(array) is the
    caller's to ensure (no bounds check, no negative indices). One vector load if the array is C-contiguous."""
    if not _check_array(array, start):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        start = context.cast(builder, args[1], signature.args[1], types.intp)
        vector_type = context.get_value_type(signature.return_type)
        if array_type.layout == "C":
            pointer = builder.bitcast(builder.gep(array.data, [start]), vector_type.as_pointer())
            return builder.load(pointer, align=array_type.dtype.bitwidth // 8)
        vector = llvm_ir.Constant(vector_type, llvm_ir.Undefined)
        for j, pointer in enumerate(_element_pointers(context, builder, array_type, array, start)):
            vector = builder.insert_element(vector, builder.load(pointer), llvm_ir.Constant(_I32, j))
        return vector

    return Lanes(array.dtype)(array, start), codegen


@intrinsic
def lanes_store(typingctx, array, start, lanes):
    """array[start + j] = lanes j, the converse of lanes_load (same dtype, same caller's bounds)."""
    if not (_check_array(array, start) and array.mutable and isinstance(lanes, Lanes) and lanes.dtype == array.dtype):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        start = context.cast(builder, args[1], signature.args[1], types.intp)
        vector = args[2]
        if array_type.layout == "C":
            pointer = builder.bitcast(builder.gep(array.data, [start]), vector.type.as_pointer())
            builder.store(vector, pointer, align=array_type.dtype.bitwidth // 8)
        else:
            for j, pointer in enumerate(_element_pointers(context, builder, array_type, array, start)):
                builder.store(builder.extract_element(vector, llvm_ir.Constant(_I32, j)), pointer)
        return context.get_dummy_value()

    return types.none(array, start, lanes), codegen


@intrinsic
def lanes_float64(typingctx, lanes):
    """float32 lanes widened to float64 (exact)."""
    if not (isinstance(lanes, Lanes) and lanes.dtype == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(args[0], context.get_value_type(signature.return_type))

    return Lanes(types.float64)(lanes), codegen


def _lanes_binary(name, operation, doc):
    def typer(typingctx, a, b):
        if not (isinstance(a, Lanes) and a == b):
            return None

        def codegen(context, builder, signature, args):
            return operation(builder, args[0], args[1])

        return a(a, b), codegen

    typer.__name__, typer.__doc__ = name, doc
    return intrinsic(typer)


def _greater_or_keep(builder, a, b):
    # Python's max(a, b): b if b > a else a (a NaN b is skipped, a NaN a is kept)
    return builder.select(builder.fcmp_ordered(">", b, a), b, a)


_lanes_add = _lanes_binary("lanes_add", lambda builder, a, b: builder.fadd(a, b), "a + b lane-wise")
_lanes_sub = _lanes_binary("lanes_sub", lambda builder, a, b: builder.fsub(a, b), "a - b lane-wise")
_lanes_mul = _lanes_binary("lanes_mul", lambda builder, a, b: builder.fmul(a, b), "a * b lane-wise")
lanes_max = _lanes_binary("lanes_max", _greater_or_keep, "Lane-wise max(a, b), Python's rule: b where b > a, else a.")


def _register_operator(operators, implementation):
    def typer(a, b):
        if isinstance(a, Lanes) and a == b:
            return lambda a, b: implementation(a, b)
        return None

    for operator_ in operators:
        overload(operator_)(typer)


# `a + b`, `a - b`, `a * b` (and `+=`, `-=`, `*=`) of two Lanes of one dtype: lane-wise IEEE, no FMA
_register_operator((operator.add, operator.iadd), _lanes_add)
_register_operator((operator.sub, operator.isub), _lanes_sub)
_register_operator((operator.mul, operator.imul), _lanes_mul)


def _lanes_reduction(name, combine, doc):
    def typer(typingctx, lanes):
        if not isinstance(lanes, Lanes):
            return None

        def codegen(context, builder, signature, args):
            vector, width = args[0], LANES
            while width > 1:  # lane j combines with lane j + width/2: the halving of step 2 above
                half = width // 2
                undef = llvm_ir.Constant(vector.type, llvm_ir.Undefined)
                low = builder.shuffle_vector(vector, undef, _mask(range(half)))
                high = builder.shuffle_vector(vector, undef, _mask(range(half, width)))
                vector = combine(builder, low, high)
                width = half
            return builder.extract_element(vector, llvm_ir.Constant(_I32, 0))

        return lanes.dtype(lanes), codegen

    typer.__name__, typer.__doc__ = name, doc
    return intrinsic(typer)


lanes_sum = _lanes_reduction("lanes_sum", lambda builder, a, b: builder.fadd(a, b),
                             "The lanes added by halving (step 2 of the documented order).")
lanes_reduce_max = _lanes_reduction("lanes_reduce_max", _greater_or_keep,
                                    "The largest lane, combined by halving with lanes_max's rule.")


@intrinsic
def lanes_head(typingctx, lanes, count):
    """Lanes j < count kept, the others +0.0 (count an integer; below 1 all are zero, above LANES - 1 none)."""
    if not (isinstance(lanes, Lanes) and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        int_vector = llvm_ir.VectorType(_I32, LANES)
        limit = _splat(builder, context.cast(builder, args[1], signature.args[1], types.int32), int_vector)
        keep = builder.icmp_signed("<", _mask(range(LANES)), limit)
        return builder.select(keep, args[0], llvm_ir.Constant(args[0].type, [0.0] * LANES))

    return lanes(lanes, count), codegen


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def lane_sum(x):
    """sum(x) of a 1-D float32 array in the documented lane order."""
    n = x.shape[0]
    acc = lanes_fill(np.float32(0.0))
    for k in range(n // LANES):
        acc += lanes_load(x, k * LANES)
    total = lanes_sum(acc)
    for i in range(n - n % LANES, n):
        total += x[i]
    return total


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def lane_dot(a, b):
    """sum(a * b) of two 1-D float32 arrays of a's length, in the documented lane order."""
    n = a.shape[0]
    acc = lanes_fill(np.float32(0.0))
    for k in range(n // LANES):
        acc += lanes_load(a, k * LANES) * lanes_load(b, k * LANES)
    total = lanes_sum(acc)
    for i in range(n - n % LANES, n):
        total += a[i] * b[i]
    return total


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def lane_max(x, initial):
    """max(initial, *x) of a 1-D float32 array (float32 `initial`), lane-wise with Python's max rule, so
    NaN elements are skipped as by max(). A max is exact, so only the sign of a zero could depend on order."""
    n = x.shape[0]
    acc = lanes_fill(initial)
    for k in range(n // LANES):
        acc = lanes_max(acc, lanes_load(x, k * LANES))
    result = lanes_reduce_max(acc)
    for i in range(n - n % LANES, n):
        result = max(result, x[i])
    return result
