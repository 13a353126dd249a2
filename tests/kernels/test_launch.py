"""The lighter Triton launch path (ucm_kernels._launch): argument classes refine Triton's specialisation, and a
launch through it computes what Triton's own launch computes, also when a later call's arguments specialise
differently (a misaligned view, a different constexpr); a kernel launched with programmatic dependent launch (on
sm_90 GPUs) still reads what the launch before it wrote."""
import pytest
import torch
import triton
import triton.language as tl

from ucm_kernels._launch import Launcher, argument_class, pdl_mode, set_pdl, wait_for_previous_grid

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit(do_not_specialize=["scale"])
def _scaled_copy(src, dst, n, scale, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=inside) * scale + SHIFT, mask=inside)


SCALED_COPY = Launcher(_scaled_copy)


def test_argument_class_separates_what_triton_specialises_on():
    base = torch.zeros(64, dtype=torch.float32)
    assert argument_class(base) == argument_class(torch.ones(8, dtype=torch.float32))
    assert argument_class(base) != argument_class(base[1:])  # 4 bytes past a 16-byte boundary
    assert argument_class(base) == argument_class(base[4:])  # 16 bytes on
    assert argument_class(base) != argument_class(base.to(torch.float64))
    assert argument_class(1) != argument_class(2) != argument_class(16)
    assert argument_class(3) == argument_class(5) and argument_class(32) == argument_class(48)
    assert argument_class(1 << 31) != argument_class(16)  # int64 against int32
    assert argument_class(True) != argument_class(False) != argument_class(None)
    assert argument_class(0.5) == argument_class(0.25)  # fp32 whatever the value
    with pytest.raises(TypeError, match="tuple"):  # keyed by identity it would keep every call's tensors alive
        argument_class((base, base))


def _expected(src, n, scale, shift):
    out = torch.zeros_like(src)
    out[:n] = src[:n] * scale + shift
    return out


@pytest.mark.parametrize("by_name", [False, True])
def test_launches_match_a_torch_reference_across_specialisations(by_name):
    storage = torch.arange(200, dtype=torch.float32, device=DEVICE)
    calls = [(storage[:100], 100, 2.0, 1), (storage[4:104], 100, 3.0, 1),  # aligned twice: the second reuses
             (storage[1:101], 97, 0.5, 1),  # misaligned: its own specialisation
             (storage[:100], 100, 2.0, 7)]  # another constexpr
    for src, n, scale, shift in calls:
        dst = torch.zeros_like(src)
        if by_name:
            SCALED_COPY((triton.cdiv(n, 32),), src=src, dst=dst, n=n, scale=scale, BLOCK=32, SHIFT=shift, num_warps=1)
        else:
            SCALED_COPY((triton.cdiv(n, 32),), src, dst, n, scale, 32, shift, num_warps=1)
        torch.testing.assert_close(dst, _expected(src, n, scale, shift), rtol=0, atol=0)
    if SCALED_COPY.compiled_path:
        assert len(SCALED_COPY._compiled) == 3  # aligned, misaligned, and the other SHIFT


def test_a_missing_parameter_is_refused_naming_the_parameters():
    src = torch.zeros(8, device=DEVICE)
    with pytest.raises(TypeError, match="scale"):
        SCALED_COPY((1,), src, src, 8, BLOCK=32, SHIFT=0)


def test_an_argument_it_cannot_class_is_refused_on_every_path():
    """Checked under the interpreter too, so that a launch site passing one fails on the CPU, not first on a GPU."""
    src = torch.zeros(8, device=DEVICE)
    with pytest.raises(TypeError, match="tuple"):
        SCALED_COPY((1,), src, src, 8, (1.0, 2.0), BLOCK=32, SHIFT=0)


@triton.jit
def _add_one(src, dst, n, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    wait_for_previous_grid(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=inside) + 1, mask=inside)


ADD_ONE = Launcher(_add_one)


@pytest.fixture
def pdl_setting():
    """Whatever a test sets with set_pdl is undone after it."""
    previous = set_pdl("1")
    yield
    set_pdl(previous)


@pytest.mark.parametrize("mode", ["1", "early"])
def test_a_chain_of_dependent_launches_reads_each_previous_result(mode, pdl_setting):
    """Each launch reads what the launch before it wrote (with PDL on sm_90 GPUs: it may start before that one
    ends): 64 launches ping-ponging between two buffers, eager and replayed from a CUDA graph, end exact."""
    set_pdl(mode)
    n, hops = 1 << 16, 64
    first = torch.arange(n, dtype=torch.int32, device=DEVICE)
    buffers = [first.clone(), torch.zeros_like(first)]

    def chain():
        for hop in range(hops):
            ADD_ONE((triton.cdiv(n, 1024),), buffers[hop % 2], buffers[1 - hop % 2], n, BLOCK=1024)

    chain()
    torch.testing.assert_close(buffers[0], first + hops, rtol=0, atol=0)
    if DEVICE == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        buffers[0].copy_(first)
        for _ in range(3):
            graph.replay()
        torch.testing.assert_close(buffers[0], first + 3 * hops, rtol=0, atol=0)


def test_pdl_is_set_by_the_launcher_from_the_device_and_the_setting(pdl_setting):
    src = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="PDL: set by the Launcher"):
        ADD_ONE((1,), src, src, 8, BLOCK=32, PDL=True)
    assert pdl_mode(None) == 0  # the interpreter
    set_pdl("0")
    assert pdl_mode(0) == 0
    with pytest.raises(ValueError, match="UCM_PDL='yes': expected one of"):
        set_pdl("yes")
    if DEVICE == "cuda":
        hopper = torch.cuda.get_device_capability(torch.cuda.current_device())[0] >= 9
        for setting, mode in (("1", 1), ("early", 2)):
            set_pdl(setting)
            assert pdl_mode(torch.cuda.current_device()) == (mode if hopper else 0)
