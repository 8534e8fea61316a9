"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step.

A decode step of a small model is ~200 short kernels, and each pays a fixed cost between the
end of one and the useful work of the next: the launch, the CTAs' dispatch, the first loads'
latency. On Hopper, a kernel launched with PDL may start while the kernel before it on the
stream is still running, as soon as every CTA of that one has signalled
``griddepcontrol.launch_dependents``. It must then execute ``griddepcontrol.wait`` before
touching anything the earlier kernel writes or reads: the wait returns once the earlier kernel
has completed and its memory is visible. Work that depends only on constant data (a GEMV's
weights) can go before the wait and overlap the earlier kernel's tail.

Rules every kernel here follows when ``USE_PDL`` is set:

- every program calls :func:`pdl_enter` (or ``pdl_wait`` then ``pdl_launch``) before its
  first access to activations, inputs, caches or outputs, and before any early ``return``, so
  a kernel never completes before the one it follows; completion is transitive down the
  stream that way, and a kernel two launches later may rely on it;
- before the wait, only weights are read and nothing is written;
- a program signals ``launch_dependents`` only after its wait, so the next kernel launches
  once this one runs, never two kernels ahead: CTAs parked in a wait hold registers and
  warp slots, and a chain of early launches would fill the SMs with them.

Kernels launched without the attribute (cuBLAS, torch, the FP8 GEMV at several rows) keep full
stream ordering, and a PDL kernel after one of them simply starts when it completes. CUDA graphs
keep the programmatic edges when a stream is captured (CUDA >= 12.3). The instructions need
sm_90; :func:`pdl_supported` decides per device, and on CPU (``TRITON_INTERPRET=1``) PDL is
always off.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # pragma: no cover - old Triton: PDL is never enabled
    gdc_launch_dependents = gdc_wait = None
    HAVE_GDC = False


def pdl_supported(device: torch.device) -> bool:
    """True where Triton kernels on ``device`` may be launched with PDL (sm_90+, CUDA)."""
    if not HAVE_GDC or device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9


def launch_options(pdl: bool) -> dict[str, Any]:
    """Extra launch keyword arguments: the PDL attribute when ``pdl`` is on, else nothing
    (so old Triton versions and the interpreter never see the option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_launch(USE_PDL: tl.constexpr):
    """Let the next kernel on the stream start launching (it still waits before its reads)."""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Block until the previous kernel on the stream has completed and its writes are visible."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """``pdl_wait`` then ``pdl_launch``: for kernels with nothing to do before their inputs."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
