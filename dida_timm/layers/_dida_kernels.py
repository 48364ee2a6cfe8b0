"""Triton kernels for the DIDA unit's dynamic paths (forward and backward), one program per (sample, channel).

Paper: `Dynamic Instance Domain Adaptation` - https://arxiv.org/abs/2203.05028

Between the unit's two 1x1 convs the eager unit runs a dozen small ops (ReLU, pooling, ReLU, the kernel table,
the grouped conv, the code's lerp, a re-layout); here they are one kernel each way. A program reads one reduced
channel `pre[n, j]` (before its ReLU), pools it into the code g = ReLU(mean(pre[n, j])), builds the channel's
kernel K_p = a_p * (g * w_p + b_p) + c_p of every path p from the generator parameters and writes the depthwise
conv of ReLU(pre[n, j]) with K_p straight into the fuse's input layout [N, paths, r, H' * W']. Taps are a vector
dimension (a [taps, positions] tile), so a program has no loop over taps.

Imported only when the kernels run: Triton is optional (it ships with torch's CUDA wheels for Linux).
"""
import triton
import triton.language as tl


@triton.jit
def _tap_offsets(
        position, height, width, out_width,
        taps_mask, tap_row, tap_col, STRIDE: tl.constexpr, DILATION: tl.constexpr, PAD: tl.constexpr,
):
    """Flat input offsets [taps, positions] read by output positions `position`, and where they are in bounds."""
    in_row = (position // out_width)[None, :] * STRIDE - PAD + tap_row[:, None] * DILATION
    in_col = (position % out_width)[None, :] * STRIDE - PAD + tap_col[:, None] * DILATION
    inside = taps_mask[:, None] & (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width)
    return in_row * width + in_col, inside


@triton.jit
def _relu(x):
    """ReLU that keeps NaN, as torch's does (tl.maximum alone returns 0 for max(NaN, 0))."""
    return tl.maximum(x, 0., propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _generated_kernel(code, w_ptr, b_ptr, a_ptr, c_ptr, taps, taps_mask):
    """The generator's kernel for `code`, K = a * (g * w + b) + c, as a vector of taps."""
    return tl.load(a_ptr).to(tl.float32) * (
        code * tl.load(w_ptr + taps, mask=taps_mask, other=0.).to(tl.float32)
        + tl.load(b_ptr + taps, mask=taps_mask, other=0.).to(tl.float32)) + tl.load(c_ptr).to(tl.float32)


@triton.jit
def _program_row(pre_ptr, channels, height, width):
    """This program's (sample, channel) row of pre [N * r, H * W]: its index, sample, channel, size and start."""
    row = tl.program_id(0)
    size = height * width
    return row, row // channels, row % channels, size, pre_ptr + row.to(tl.int64) * size


@triton.jit
def _path_forward(
        pre_row, out_row, code, w_ptr, b_ptr, a_ptr, c_ptr, height, width, out_width, out_size,
        STRIDE: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr, TAPS: tl.constexpr, BLOCK: tl.constexpr,
):
    taps = tl.arange(0, TAPS)
    taps_mask = taps < KSIZE * KSIZE
    kernel = _generated_kernel(code, w_ptr, b_ptr, a_ptr, c_ptr, taps, taps_mask)
    for start in range(0, out_size, BLOCK):
        position = start + tl.arange(0, BLOCK)
        offsets, inside = _tap_offsets(position, height, width, out_width, taps_mask, taps // KSIZE, taps % KSIZE,
                                       STRIDE, DILATION, DILATION * (KSIZE - 1) // 2)
        inside = inside & (position < out_size)[None, :]
        feat = _relu(tl.load(pre_row + offsets, mask=inside, other=0.).to(tl.float32))
        out = tl.sum(kernel[:, None] * feat, 0)
        tl.store(out_row + position, out.to(out_row.dtype.element_ty), mask=position < out_size)


@triton.jit
def dynamic_paths_forward(
        pre_ptr, out_ptr, code_ptr,
        w1_ptr, b1_ptr, a1_ptr, c1_ptr, w2_ptr, b2_ptr, a2_ptr, c2_ptr,
        channels, height, width, out_width, out_size,
        STRIDE: tl.constexpr, PATHS: tl.constexpr,
        KSIZE1: tl.constexpr, DILATION1: tl.constexpr, TAPS1: tl.constexpr,
        KSIZE2: tl.constexpr, DILATION2: tl.constexpr, TAPS2: tl.constexpr,
        BLOCK: tl.constexpr,
):
    """pre [N, r, H * W] -> out [N, PATHS, r, H' * W'] and the codes [N, r] (fp32)."""
    row, sample, channel, size, pre_row = _program_row(pre_ptr, channels, height, width)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, size, BLOCK):
        position = start + tl.arange(0, BLOCK)
        total += tl.load(pre_row + position, mask=position < size, other=0.).to(tl.float32)
    code = _relu(tl.sum(total, 0) / size)
    tl.store(code_ptr + row, code)
    out_row = out_ptr + (sample.to(tl.int64) * PATHS * channels + channel) * out_size
    _path_forward(pre_row, out_row, code, w1_ptr, b1_ptr, a1_ptr, c1_ptr, height, width, out_width, out_size,
                  STRIDE, KSIZE1, DILATION1, TAPS1, BLOCK)
    if PATHS == 2:
        _path_forward(pre_row, out_row + tl.cast(channels, tl.int64) * out_size, code, w2_ptr, b2_ptr, a2_ptr, c2_ptr,
                      height, width, out_width, out_size, STRIDE, KSIZE2, DILATION2, TAPS2, BLOCK)


@triton.jit
def _path_kernel_grad(
        pre_row, grad_row, kernel_grad_row, w_ptr, a_ptr, height, width, out_width, out_size,
        STRIDE: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr, TAPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Store dL/dK of one path (sum over positions of grad * the tap's input) and return its share of dL/dg."""
    taps = tl.arange(0, TAPS)
    taps_mask = taps < KSIZE * KSIZE
    total = tl.zeros([TAPS, BLOCK], tl.float32)
    for start in range(0, out_size, BLOCK):
        position = start + tl.arange(0, BLOCK)
        offsets, inside = _tap_offsets(position, height, width, out_width, taps_mask, taps // KSIZE, taps % KSIZE,
                                       STRIDE, DILATION, DILATION * (KSIZE - 1) // 2)
        inside = inside & (position < out_size)[None, :]
        feat = _relu(tl.load(pre_row + offsets, mask=inside, other=0.).to(tl.float32))
        grad = tl.load(grad_row + position, mask=position < out_size, other=0.).to(tl.float32)
        total += grad[None, :] * feat
    kernel_grad = tl.sum(total, 1)
    tl.store(kernel_grad_row + taps, kernel_grad, mask=taps_mask)
    # dK/dg = a * w
    weight = tl.load(w_ptr + taps, mask=taps_mask, other=0.).to(tl.float32)
    return tl.sum(kernel_grad * weight, 0) * tl.load(a_ptr).to(tl.float32)


@triton.jit
def _path_feature_grad(
        grad_row, code, w_ptr, b_ptr, a_ptr, c_ptr, position, height, width, out_height, out_width,
        STRIDE: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr, TAPS: tl.constexpr,
):
    """dL/dReLU(pre) at input `position` from one path: the transposed depthwise conv of its output gradient."""
    taps = tl.arange(0, TAPS)
    taps_mask = taps < KSIZE * KSIZE
    kernel = _generated_kernel(code, w_ptr, b_ptr, a_ptr, c_ptr, taps, taps_mask)
    pad = DILATION * (KSIZE - 1) // 2
    # the output position that reads this input through tap t: (in + pad - t * dilation) / stride, when whole
    row_num = (position // width)[None, :] + pad - (taps // KSIZE)[:, None] * DILATION
    col_num = (position % width)[None, :] + pad - (taps % KSIZE)[:, None] * DILATION
    inside = taps_mask[:, None] & (row_num >= 0) & (col_num >= 0) & (row_num % STRIDE == 0) & (col_num % STRIDE == 0)
    out_row, out_col = row_num // STRIDE, col_num // STRIDE
    inside = inside & (out_row < out_height) & (out_col < out_width) & (position < height * width)[None, :]
    grad = tl.load(grad_row + out_row * out_width + out_col, mask=inside, other=0.).to(tl.float32)
    return tl.sum(kernel[:, None] * grad, 0)


@triton.jit
def dynamic_paths_backward(
        pre_ptr, grad_ptr, code_ptr, pre_grad_ptr, kernel_grad_ptr,
        w1_ptr, b1_ptr, a1_ptr, c1_ptr, w2_ptr, b2_ptr, a2_ptr, c2_ptr,
        channels, height, width, out_height, out_width,
        STRIDE: tl.constexpr, PATHS: tl.constexpr,
        KSIZE1: tl.constexpr, DILATION1: tl.constexpr, TAPS1: tl.constexpr,
        KSIZE2: tl.constexpr, DILATION2: tl.constexpr, TAPS2: tl.constexpr,
        BLOCK: tl.constexpr,
):
    """dL/dpre [N, r, H * W] and dL/dK per (sample, channel) [N * r, KSIZE1^2 + KSIZE2^2] from dL/dout."""
    row, sample, channel, size, pre_row = _program_row(pre_ptr, channels, height, width)
    out_size = out_height * out_width
    path_stride = tl.cast(channels, tl.int64) * out_size  # int64 (either factor may be a compile-time 1)
    grad_row = grad_ptr + (sample.to(tl.int64) * PATHS * channels + channel) * out_size
    kernel_grad_row = kernel_grad_ptr + row.to(tl.int64) * (KSIZE1 * KSIZE1 + KSIZE2 * KSIZE2 * (PATHS - 1))
    code = tl.load(code_ptr + row)
    code_grad = _path_kernel_grad(pre_row, grad_row, kernel_grad_row, w1_ptr, a1_ptr, height, width, out_width,
                                  out_size, STRIDE, KSIZE1, DILATION1, TAPS1, BLOCK)
    if PATHS == 2:
        code_grad += _path_kernel_grad(pre_row, grad_row + path_stride, kernel_grad_row + KSIZE1 * KSIZE1,
                                       w2_ptr, a2_ptr, height, width, out_width, out_size,
                                       STRIDE, KSIZE2, DILATION2, TAPS2, BLOCK)
    # g = ReLU(mean(pre)): each position gets dL/dg / (H * W) unless the mean was <= 0 (torch's ReLU backward: 0 at 0,
    # NaN passes)
    pooled_grad = tl.where(code <= 0., 0., code_grad / size)
    for start in range(0, size, BLOCK):
        position = start + tl.arange(0, BLOCK)
        feat_grad = _path_feature_grad(grad_row, code, w1_ptr, b1_ptr, a1_ptr, c1_ptr, position, height, width,
                                       out_height, out_width, STRIDE, KSIZE1, DILATION1, TAPS1)
        if PATHS == 2:
            feat_grad += _path_feature_grad(grad_row + path_stride, code, w2_ptr, b2_ptr, a2_ptr, c2_ptr,
                                            position, height, width, out_height, out_width,
                                            STRIDE, KSIZE2, DILATION2, TAPS2)
        pre = tl.load(pre_row + position, mask=position < size, other=0.).to(tl.float32)
        pre_grad = tl.where(pre <= 0., 0., feat_grad) + pooled_grad
        tl.store(pre_grad_ptr + row.to(tl.int64) * size + position, pre_grad.to(pre_grad_ptr.dtype.element_ty),
                 mask=position < size)


@triton.jit
def _path_generator_grads(
        kernel_grad_ptr, code_ptr, w_ptr, b_ptr, a_ptr, w_grad_ptr, b_grad_ptr, a_grad_ptr, c_grad_ptr,
        rows, columns, column,
        KSIZE: tl.constexpr, TAPS: tl.constexpr, ROWS: tl.constexpr,
):
    """One path's generator gradients from dL/dK [rows, columns] (its taps from `column`) and the codes [rows].

    K = a * (g * w + b) + c, so with S1 = sum g * dL/dK and S0 = sum dL/dK over every (sample, channel):
    dL/dw = a * S1, dL/db = a * S0, dL/da = sum(w * S1 + b * S0), dL/dc = sum(S0).
    """
    taps = tl.arange(0, TAPS)
    taps_mask = taps < KSIZE * KSIZE
    first = tl.zeros([ROWS, TAPS], tl.float32)
    zeroth = tl.zeros([ROWS, TAPS], tl.float32)
    for start in range(0, rows, ROWS):
        row = start + tl.arange(0, ROWS)
        inside = (row < rows)[:, None] & taps_mask[None, :]
        kernel_grad = tl.load(kernel_grad_ptr + row[:, None].to(tl.int64) * columns + column + taps[None, :],
                              mask=inside, other=0.)
        code = tl.load(code_ptr + row, mask=row < rows, other=0.)
        first += code[:, None] * kernel_grad
        zeroth += kernel_grad
    s1 = tl.sum(first, 0)
    s0 = tl.sum(zeroth, 0)
    scale = tl.load(a_ptr).to(tl.float32)
    weight = tl.load(w_ptr + taps, mask=taps_mask, other=0.).to(tl.float32)
    bias = tl.load(b_ptr + taps, mask=taps_mask, other=0.).to(tl.float32)
    tl.store(w_grad_ptr + taps, (scale * s1).to(w_grad_ptr.dtype.element_ty), mask=taps_mask)
    tl.store(b_grad_ptr + taps, (scale * s0).to(b_grad_ptr.dtype.element_ty), mask=taps_mask)
    tl.store(a_grad_ptr, tl.sum(weight * s1 + bias * s0, 0).to(a_grad_ptr.dtype.element_ty))
    tl.store(c_grad_ptr, tl.sum(s0, 0).to(c_grad_ptr.dtype.element_ty))


@triton.jit
def generator_grads(
        kernel_grad_ptr, code_ptr,
        w1_ptr, b1_ptr, a1_ptr, w2_ptr, b2_ptr, a2_ptr,
        w1_grad_ptr, b1_grad_ptr, a1_grad_ptr, c1_grad_ptr, w2_grad_ptr, b2_grad_ptr, a2_grad_ptr, c2_grad_ptr,
        rows,
        PATHS: tl.constexpr, KSIZE1: tl.constexpr, TAPS1: tl.constexpr, KSIZE2: tl.constexpr, TAPS2: tl.constexpr,
        ROWS: tl.constexpr,
):
    """Every path's generator gradients, a program per path (grid (PATHS,)).

    Not both paths in one program: with both paths' reductions in one function, LLVM's SLP vectorizer (Triton 3.8,
    sm_90) crashed compiling it for a second path of 25 or more taps.
    """
    columns = KSIZE1 * KSIZE1 + KSIZE2 * KSIZE2 * (PATHS - 1)
    if tl.program_id(0) == 0:
        _path_generator_grads(kernel_grad_ptr, code_ptr, w1_ptr, b1_ptr, a1_ptr, w1_grad_ptr, b1_grad_ptr, a1_grad_ptr,
                              c1_grad_ptr, rows, columns, 0, KSIZE1, TAPS1, ROWS)
    else:
        _path_generator_grads(kernel_grad_ptr, code_ptr, w2_ptr, b2_ptr, a2_ptr, w2_grad_ptr, b2_grad_ptr,
                              a2_grad_ptr, c2_grad_ptr, rows, columns, KSIZE1 * KSIZE1, KSIZE2, TAPS2, ROWS)
