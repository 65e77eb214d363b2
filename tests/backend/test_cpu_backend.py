"""megatron_sed.backend.cpu: Megatron's CUDA-only calls on CPU tensors. Each test runs in
a fresh interpreter (the backend patches torch process-wide; the pytest process stays
clean), see tests.helpers.dist.run_distributed."""

from __future__ import annotations

import importlib
import time

import pytest
import torch

from tests.helpers.dist import run_distributed


def _devices(rank, world):
    from megatron_sed.backend import cpu

    cpu.install()
    cpu.install()  # idempotent
    assert cpu.is_active()
    for t in (
        torch.empty(2, device="cuda"),
        torch.zeros(3, device=torch.device("cuda", 0)),
        torch.ones(2, device=torch.cuda.current_device()),
        torch.arange(3, device="cuda:0"),
        torch.tensor([1.0], device="cuda"),
        torch.ones(2).to("cuda"),
        torch.ones(2).to(torch.device("cuda"), non_blocking=True),
        torch.ones(2).cuda(),
        torch.ones(2).to(device="cuda"),
    ):
        assert t.device.type == "cpu"
    m = torch.nn.Linear(2, 2).cuda()
    assert m.weight.device.type == "cpu"
    assert torch.ones(2).to(torch.float64).dtype == torch.float64  # a dtype is not a device
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0 and torch.cuda.get_device_capability() == (8, 0)
    assert "cpu" in torch.cuda.get_device_properties(0).name
    assert not torch.accelerator.is_available()
    # Megatron's mixed-precision optimizers check the type string.
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float16).dtype == torch.float16
    # Streams and events keep program order; events time wall clock (Megatron's timers).
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x = torch.ones(3, device="cuda") * 2
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    y = x @ x
    time.sleep(0.05)
    end.record()
    torch.cuda.synchronize()
    assert y.item() == 12.0
    assert 50.0 <= start.elapsed_time(end) < 5000.0  # milliseconds, as CUDA events report
    assert end.elapsed_time(start) == -start.elapsed_time(end)
    assert torch.cuda.memory_allocated() == 0 and torch.cuda.memory_stats()["allocated_bytes.all.peak"] == 0
    # Data loaders never pin.
    dl = torch.utils.data.DataLoader(list(range(4)), batch_size=2, pin_memory=True)
    assert [b.tolist() for b in dl] == [[0, 1], [2, 3]]
    assert torch.ones(1).pin_memory().device.type == "cpu"
    # Nor do factories (Megatron's CP slicing of RoPE: torch.tensor(..., pin_memory=True)).
    assert torch.tensor([1, 2], device="cpu", pin_memory=True).cuda(non_blocking=True).tolist() == [1, 2]
    assert torch.empty(2, pin_memory=True).shape == (2,)
    cpu.uninstall()
    assert not cpu.is_active()
    assert torch.cuda.is_available() is False  # this machine has no GPU
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):  # no driver / not compiled with CUDA
        torch.empty(1, device="cuda")


def test_cuda_devices_and_api_map_to_cpu_and_uninstall_restores():
    run_distributed(_devices, 1)


def _rng(rank, world):
    from megatron_sed.backend import cpu

    cpu.install()
    # "CUDA" random numbers come from their own generator, reproducibly ...
    torch.cuda.manual_seed(5)
    a = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(5)
    assert torch.equal(a, torch.rand(4, device="cuda"))
    state = torch.cuda.get_rng_state()
    b = torch.randn(3, device="cuda")
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.randn(3, device="cuda"))
    # ... and never consume the CPU generator (weights initialised on the CPU must not
    # depend on how many CUDA random numbers were drawn before, e.g. by a warm-up).
    torch.manual_seed(1)
    x = torch.rand(3)
    torch.manual_seed(1)
    torch.rand(1000, device="cuda")
    assert torch.equal(x, torch.rand(3))
    # Dropout draws from the CUDA generator too, so Megatron's RNG tracker fork() gives
    # tensor-parallel regions their own masks.
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 1234)
    torch.cuda.manual_seed(7)
    ones = torch.ones(1000, device="cuda")
    outside = torch.nn.functional.dropout(ones, p=0.5, training=True)
    with tracker.fork():
        inside = torch.nn.functional.dropout(ones, p=0.5, training=True)
    torch.cuda.manual_seed(7)
    again = torch.nn.functional.dropout(ones, p=0.5, training=True)
    assert torch.equal(outside, again) and not torch.equal(outside, inside)
    assert set(outside.unique().tolist()) == {0.0, 2.0}
    assert 400 < int((outside == 0).sum()) < 600
    assert torch.equal(torch.nn.functional.dropout(ones, p=0.5, training=False), ones)


def test_cuda_rng_is_separate_and_drives_dropout_and_megatron_tracker():
    run_distributed(_rng, 1)


def _refuses_on_gpu(rank, world):
    torch.cuda.is_available = lambda: True  # what torch reports on a GPU machine
    from megatron_sed.backend import cpu

    cpu = importlib.reload(cpu)  # as if first imported on that machine
    assert cpu.gpu_present()
    with pytest.raises(RuntimeError, match="has a CUDA GPU"):
        cpu.install()
    assert not cpu.is_active()


def test_install_refuses_on_a_machine_with_a_gpu():
    run_distributed(_refuses_on_gpu, 1)


def _megatron_step(rank, world):
    """Megatron-Core's DDP + distributed optimizer + pipeline schedule on CPU tensors."""
    from megatron_sed.backend import cpu

    cpu.install()

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16)
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    model = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), Float16Module(cfg, model)
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-2, bf16=True, use_distributed_optimizer=True), [model])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(16).repeat(2, 1).cuda()

    def step(it, m):
        out = m(tokens, pos, None, labels=tokens)
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    losses = []
    for _ in range(3):
        model.zero_grad_buffer()
        opt.zero_grad()
        r = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=16,
            micro_batch_size=2,
            forward_only=False,
        )
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
        losses.append(float(r[0]["loss"]))
    assert losses[-1] < losses[0], losses
    ps.destroy_model_parallel()


def test_megatron_ddp_distributed_optimizer_and_schedule_run_on_cpu():
    run_distributed(_megatron_step, 2)
