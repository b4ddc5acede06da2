"""Learned bottlenecks inserted into a graph: the wiring, the principal-component start (exact
at full rank), and the quantizer in the loop with its straight-through gradient."""
import torch
import torch.fx as fx
from torch import nn

from coach_fx.passes.bottleneck import (BottleneckDecoder, BottleneckEncoder, BottleneckSpec, bottlenecks,
                                        init_from, insert_bottlenecks)
from coach_fx.passes.ops import fake_quantize_per_sample


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return self.head(f) + f.mean()


def test_a_bottleneck_sits_between_a_node_and_all_its_readers():
    gm = fx.symbolic_trace(Tiny().eval())
    out = insert_bottlenecks(gm, {"relu": BottleneckSpec(8, 2)})
    names = [n.name for n in out.graph.nodes]
    assert names.index("relu") < names.index("coach_cut_0_enc") < names.index("coach_cut_0_dec")
    dec = next(n for n in out.graph.nodes if n.name == "coach_cut_0_dec")
    readers = {u.name for u in next(n for n in out.graph.nodes if n.name == "relu").users}
    assert readers == {"coach_cut_0_enc"}                 # only the encoder reads it now
    assert len(dec.users) == 2                            # the head and the mean read the decoder
    assert "coach_cut_0_enc" not in {n.name for n in gm.graph.nodes}   # the original is untouched
    x = torch.randn(2, 3, 8, 8)
    assert out(x).shape == gm(x).shape and len(bottlenecks(out)) == 1


def test_the_principal_component_start_is_exact_at_full_rank():
    """With as many code channels as the tensor has (per patch), PCA is a change of basis: the
    decoder gives back the encoder's input exactly (the refinement starts at zero)."""
    torch.manual_seed(0)
    for spec, shape in ((BottleneckSpec(6, 6), (16, 6, 5, 5)), (BottleneckSpec(3, 12, stride=2), (16, 3, 6, 6))):
        x = torch.randn(*shape) * torch.linspace(0.1, 3, shape[1])[None, :, None, None] + 0.5
        enc, dec = BottleneckEncoder(spec), BottleneckDecoder(spec)
        init_from(enc, dec, x, spec)
        with torch.no_grad():
            code = enc(x)
            assert code.shape == spec.code_shape(shape)
            assert torch.allclose(dec(code), x, atol=1e-4)


def test_fewer_channels_keep_the_strongest_directions():
    torch.manual_seed(0)
    strong = torch.randn(64, 1, 4, 4) * 5
    x = torch.cat([strong, 0.01 * torch.randn(64, 3, 4, 4)], 1)   # one direction carries all
    spec = BottleneckSpec(4, 1)
    enc, dec = BottleneckEncoder(spec), BottleneckDecoder(spec)
    init_from(enc, dec, x, spec)
    with torch.no_grad():
        err = (dec(enc(x)) - x).pow(2).mean() / x.pow(2).mean()
    assert err < 1e-3


def test_training_codes_pass_the_quantizer_with_a_straight_through_gradient():
    spec = BottleneckSpec(4, 2)
    enc = BottleneckEncoder(spec).train()
    enc.train_bits = 3
    x = torch.randn(2, 4, 3, 3)
    code = enc(x)
    with torch.no_grad():
        assert torch.equal(code, fake_quantize_per_sample(enc.conv(x), 3, 1))
    code.sum().backward()
    plain = BottleneckEncoder(spec)
    plain.load_state_dict(enc.state_dict())
    plain.conv(x).sum().backward()
    assert torch.allclose(enc.conv.weight.grad, plain.conv.weight.grad)   # as if there were no quantizer
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(x), enc.conv(x))          # deployed: the code as computed
