"""kernels/hugepages.py: weights moved into one huge-page arena keep their values, objects and aliasing; the
advice is best effort and can be turned off."""

from __future__ import annotations

import pytest
import torch

from kernels import hugepages


def _params() -> tuple[torch.nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(300, 577, generator=g), requires_grad=False)  # 0.7 MB
    m.b = torch.nn.Parameter(torch.randn(1000, 600, generator=g).to(torch.bfloat16), requires_grad=False)
    m.c = torch.nn.Parameter(torch.randn(7, generator=g), requires_grad=False)  # too small: stays
    shared = torch.randn(900, 700, generator=g)
    m.t1 = torch.nn.Parameter(shared, requires_grad=False)  # two Parameters on one storage (tied weights)
    m.t2 = torch.nn.Parameter(shared, requires_grad=False)
    return m, shared


def test_move_keeps_values_objects_and_ties(monkeypatch) -> None:
    monkeypatch.delenv(hugepages.ENV_OFF, raising=False)
    m, _ = _params()
    before = {name: (p, p.detach().clone()) for name, p in m.named_parameters(remove_duplicate=False)}
    arena, moved = hugepages.move_to_arena([p for _, p in m.named_parameters(remove_duplicate=False)])
    if arena is None:
        pytest.skip("this kernel refuses huge-page advice (THP off, or not Linux)")
    for name, (obj, value) in before.items():
        p = getattr(m, name)
        assert p is obj and torch.equal(p, value) and p.dtype == value.dtype
    base = torch.frombuffer(arena, dtype=torch.uint8).data_ptr()
    inside = {name for name, p in m.named_parameters(remove_duplicate=False)
              if base <= p.data_ptr() < base + len(arena)}
    assert inside == {"a", "b", "t1", "t2"}
    assert m.t1.data_ptr() == m.t2.data_ptr()  # still one tensor's memory
    assert moved == sum(-(-n // 64) * 64 for n in (m.a.nbytes, m.b.nbytes, m.t1.nbytes))
    assert all(p.data_ptr() % 64 == 0 for name, p in m.named_parameters() if name in inside)


def test_off_switch_and_non_cpu(monkeypatch) -> None:
    monkeypatch.setenv(hugepages.ENV_OFF, "1")
    m, _ = _params()
    ptr = m.a.data_ptr()
    assert hugepages.move_to_arena(list(m.parameters())) == (None, 0)
    assert hugepages.advise(m.parameters(), collapse=True) == 0
    assert m.a.data_ptr() == ptr
    monkeypatch.delenv(hugepages.ENV_OFF)
    assert hugepages.advise([torch.empty(0, device="meta")], collapse=False) == 0
