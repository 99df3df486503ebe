"""torch.compile of the encoder blocks (model.compile_blocks): each block kind traces as one graph,
one graph serves all of an encoder's blocks, and compiled blocks give eager's losses and gradients.

The tests compile with the ``eager`` and ``aot_eager`` backends: they run dynamo's tracing (and
AOTAutograd's forward/backward split) that inductor also starts from, in seconds on this CPU; the
inductor build itself is timed by benchmarks/train_step.py --compile-blocks and checked on GPU by
tests/test_gpu.py."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model_fixtures import batches, relative_error, tiny_config
from xfm_scale import build_model
from xfm_scale import distributed
from xfm_scale.model.layers import padding_mask

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("world_of_one")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    # past its recompile limit dynamo would quietly run a block eagerly: make that an error here
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _block_inputs(cfg, B: int = 2, L: int = 8):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(B, L, cfg.text.hidden_size, generator=g, requires_grad=True)
    mask = padding_mask(torch.ones(B, L, dtype=torch.long))
    image = torch.randn(B, 1 + cfg.vision.num_patches, cfg.vision.hidden_size, generator=g, requires_grad=True)
    return text, mask, image


def test_each_block_kind_traces_as_one_graph():
    """No graph breaks in a text, vision or fusion block (dropout off: with attention dropout the
    TP-RNG fork runs eagerly by design)."""
    cfg = tiny_config()
    model = build_model(cfg).train()
    text, mask, image = _block_inputs(cfg)
    for name, block, args in (("text", model.text.blocks[0], (text, mask)),
                              ("vision", model.vision.blocks[0], (image,)),
                              ("fusion", model.fusion.blocks[0], (text, mask, image))):
        explained = torch._dynamo.explain(block)(*args)
        reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, reasons)


def test_one_graph_serves_every_vision_block_despite_per_layer_drop_path():
    """BEiT gives each block its own drop-path rate; as a tensor it does not specialise the graph,
    so ten blocks compile once (plus variants), not ten times, and none falls back to eager."""
    cfg = tiny_config(dropout=True)
    cfg.vision.num_layers = 10
    assert cfg.vision.drop_path_rate == 0.1  # block i drops with rate 0.1 * i / 9
    model = build_model(cfg).train()
    model.compile_blocks(backend="eager")
    _, image_batch, _ = batches(cfg)
    model(image_batch).total.backward()
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 3, f"{graphs} graphs for 10 vision blocks (the no-grad target pass and the masked pass)"


def _losses_and_grads(model, cfg, seed: int):
    distributed.seed_everything(seed)
    model.zero_grad(set_to_none=True)
    outs = [model(b) for b in batches(cfg, seed=2)]
    sum(o.total for o in outs).backward()
    losses = {f"{i}/{k}": v.item() for i, o in enumerate(outs) for k, v in o.losses.items()}
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_give_eager_losses_and_gradients():
    """All three micro-batch kinds (every objective), with dropout, attention dropout on the TP
    stream (run eagerly between graphs) and drop-path on, text and fusion blocks checkpointed
    through DeepSpeed's checkpoint (the recompute runs the compiled block again and must replay
    its masks), vision blocks not: the same losses and gradients as the eager model. The ``eager``
    backend runs dynamo's graphs as captured (guards, graph breaks around the eager attention) in
    seconds; AOTAutograd's compiled backward is compared in the engine test
    (tests/engine/test_engine_parity.py, aot_eager). Both draw random numbers as eager does, so
    from one seed the masks are the same."""
    cfg = tiny_config(dropout=True)
    cfg.set_activation_checkpointing(True)
    cfg.vision.activation_checkpointing = False
    eager = build_model(cfg).train()
    compiled = build_model(cfg).train()  # (a deepcopy cannot copy the layers' process groups)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(backend="eager")
    expected_losses, expected_grads = _losses_and_grads(eager, cfg, seed=3)
    losses, grads = _losses_and_grads(compiled, cfg, seed=3)
    assert counters["stats"]["unique_graphs"] >= 3  # the blocks really went through dynamo
    assert set(losses) == set(expected_losses) and len(losses) == 6  # mlm; mim; itc, itm, imlm, mim
    for key, value in expected_losses.items():
        assert losses[key] == pytest.approx(value, rel=1e-5), key
    assert set(grads) == set(expected_grads)
    worst = max(relative_error(grads[n], expected_grads[n]) for n in expected_grads)
    assert worst < 1e-5, f"compiled gradients differ from eager: {worst:.2e}"
    # dropout is really on: another seed gives other losses, so the equality above is not vacuous
    other_seed, _ = _losses_and_grads(compiled, cfg, seed=4)
    assert any(abs(other_seed[k] - losses[k]) > 1e-4 * abs(losses[k]) for k in losses)


def test_run_config_refuses_an_unknown_compile_backend_and_tensor_parallelism(demo_world, tmp_path):
    from xfm_scale.config import run as run_config
    from xfm_scale.config import ConfigError

    raw = {"model": {"compile_blocks": True, "compile_backend": "inductr"},
           "data": {"spec": str(demo_world.spec), "tokenizer_dir": str(demo_world.tokenizer_dir)},
           "batch": {"micro_batch_size": 4, "global_batch_size": 8}, "train": {"steps": 1},
           "deepspeed": {"overrides": {"zero_optimization.stage": 2}}}
    with pytest.raises(ConfigError, match="model.compile_backend='inductr' is not a torch.compile backend; use one of"):
        run_config.from_dict(raw, base_dir=str(tmp_path)).validate()
    raw["model"]["compile_backend"] = "inductor"
    run_config.from_dict(raw, base_dir=str(tmp_path)).validate()
    raw["parallel"] = {"tensor_parallel_size": 2}
    with pytest.raises(ConfigError, match="model.compile_blocks=true with parallel.tensor_parallel_size=2: "):
        run_config.from_dict(raw, base_dir=str(tmp_path)).validate()
