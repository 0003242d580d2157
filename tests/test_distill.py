"""Cloned knowledge distillation: KD loss against hand computation, memory, consensus IoU, label noise."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedllm.algorithms.distill import (
    IGNORE_INDEX,
    TeacherMemory,
    consensus_iou,
    distill_lm_step,
    kd_loss,
    shuffle_labels,
)


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_kd_loss_matches_hand_computation_with_t_squared():
    # Prepare: one example, three classes, two teachers, t = 2 (so t² = 4)
    s, t1, t2, y, t = [1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, -1.0, 0.5], 1, 2.0
    ce = -math.log(softmax(s)[y])
    kl1 = kl(softmax(t1, t), softmax(s, t))
    kl2 = kl(softmax(t2, t), softmax(s, t))
    # Execute
    got = kd_loss(torch.tensor([s]), [torch.tensor([t1]), torch.tensor([t2])], torch.tensor([y]), t=t)
    half = kd_loss(torch.tensor([s]), [torch.tensor([t1])], torch.tensor([y]), t=t, alpha=0.5)
    # Assert
    assert got.item() == pytest.approx(ce + 4.0 * (kl1 + kl2) / 2, rel=1e-6)
    assert half.item() == pytest.approx(ce + 0.5 * 4.0 * kl1, rel=1e-6)


def test_kd_loss_averages_kl_over_the_batch():
    student, teacher = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    per_row = [kl(softmax(teacher[i].tolist(), 3.0), softmax(student[i].tolist(), 3.0)) for i in range(5)]
    got = kd_loss(student, [teacher], y, t=3.0)
    assert got.item() == pytest.approx(F.cross_entropy(student, y).item() + 9.0 * sum(per_row) / 5, rel=1e-5)


def test_kd_loss_is_cross_entropy_when_teacher_equals_student_or_no_teacher():
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    ce = F.cross_entropy(z, y).item()
    assert kd_loss(z, [z.clone()], y, t=4.0).item() == pytest.approx(ce, abs=1e-6)
    assert kd_loss(z, [], y, t=4.0).item() == pytest.approx(ce, abs=1e-7)


def test_kd_loss_is_finite_when_the_teacher_masks_a_class():
    teacher = torch.tensor([[0.0, 1.0, -float("inf")]])
    got = kd_loss(torch.tensor([[1.0, 2.0, 0.0]]), [teacher], torch.tensor([1]), t=1.0)
    p = softmax([0.0, 1.0])
    q = softmax([1.0, 2.0, 0.0])
    expected = -math.log(q[1]) + sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q[:2]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_gradient_does_not_reach_the_teacher():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    kd_loss(student, [teacher], torch.tensor([0, 1, 2]), t=2.0).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("kwargs", [{"t": 0.0}, {"t": -1.0}, {"t": 2.0, "alpha": -0.1}])
def test_kd_loss_rejects_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError, match="temperature|alpha"):
        kd_loss(torch.zeros(2, 3), [torch.zeros(2, 3)], torch.tensor([0, 1]), **kwargs)


def test_kd_loss_rejects_mismatched_teacher_shape():
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.zeros(2, 3), [torch.zeros(2, 4)], torch.tensor([0, 1]), t=1.0)


def lm_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt tokens of the first sequence
    labels[1, :2] = IGNORE_INDEX
    return student, teacher, labels


def test_distill_lm_step_matches_a_hand_loop_over_response_tokens():
    # Prepare
    student, teacher, labels = lm_case()
    t, terms = 2.0, []
    for b in range(2):
        for i in range(4):  # position i predicts token i + 1
            if labels[b, i + 1] == IGNORE_INDEX:
                continue
            s, z = student[b, i].tolist(), teacher[b, i].tolist()
            ce = -math.log(softmax(s)[int(labels[b, i + 1])])
            terms.append(ce + t * t * kl(softmax(z, t), softmax(s, t)))
    # Execute
    got = distill_lm_step(student, [teacher], {"labels": labels}, t)
    # Assert: 2 + 3 response positions
    assert len(terms) == 5
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_distill_lm_step_ignores_prompt_logits_and_is_ce_for_identical_teacher():
    student, teacher, labels = lm_case(1)
    base = distill_lm_step(student, [teacher], {"labels": labels}, 3.0)
    changed = teacher.clone()
    changed[0, :2] += 100.0  # positions predicting prompt tokens only
    assert distill_lm_step(student, [changed], {"labels": labels}, 3.0).item() == pytest.approx(base.item())
    ce_only = distill_lm_step(student, [], {"labels": labels}, 3.0)
    assert distill_lm_step(student, [student.clone()], {"labels": labels}, 3.0).item() == pytest.approx(
        ce_only.item(), abs=1e-6)


def test_distill_lm_step_rejects_batches_without_response_tokens():
    student, teacher, labels = lm_case()
    with pytest.raises(ValueError, match="no response tokens"):
        distill_lm_step(student, [teacher], {"labels": torch.full_like(labels, IGNORE_INDEX)}, 1.0)
    with pytest.raises(ValueError, match="labels"):
        distill_lm_step(student, [teacher], {}, 1.0)


def state(v):
    return {"w": torch.full((2,), float(v)), "b": torch.tensor([v])}


def test_teacher_memory_is_fifo_and_copies_states():
    memory = TeacherMemory(2)
    first = state(1)
    for s in (first, state(2), state(3)):
        memory.push(s)
    first["w"] += 100  # later edits by the caller must not leak into the memory
    assert len(memory) == 2
    assert [int(s["b"]) for s in memory.teachers()] == [2, 3]
    memory.push(state(4))
    assert [int(s["b"]) for s in memory.teachers()] == [3, 4]


def test_teacher_memory_state_round_trip():
    memory = TeacherMemory(3)
    for v in (5, 6):
        memory.push(state(v))
    restored = TeacherMemory(1)
    restored.load_state_dict(memory.state_dict())
    assert restored.capacity == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(restored.teachers(), memory.teachers()) for k in a)
    for v in (7, 8):
        restored.push(state(v))
    assert [int(s["b"]) for s in restored.teachers()] == [6, 7, 8]


def test_teacher_memory_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        TeacherMemory(0)
    with pytest.raises(ValueError, match="exceed"):
        TeacherMemory(1).load_state_dict({"capacity": 1, "teachers": [state(1), state(2)]})


def test_consensus_iou_on_hand_made_predictions():
    y = torch.tensor([0, 1, 2, 3, 4])
    teacher = torch.tensor([0, 1, 9, 9, 4])  # right on {0, 1, 4}
    student = torch.tensor([0, 9, 2, 9, 4])  # right on {0, 2, 4}
    assert consensus_iou(teacher, student, y) == pytest.approx(2 / 4)
    assert consensus_iou(y, y, y) == 1.0
    assert consensus_iou(y + 1, y + 2, y) == 0.0  # neither is ever right
    with pytest.raises(ValueError, match="shape"):
        consensus_iou(y[:3], y, y)


def test_shuffle_labels_rate_and_histogram():
    # Prepare: 20,000 balanced labels over 10 classes
    y = torch.arange(20_000) % 10
    # Execute
    noisy = shuffle_labels(y, 0.3, torch.Generator().manual_seed(0))
    # Assert: about p·(1 − 1/C) = 0.27 change; the histogram is kept; the input is untouched
    assert (noisy != y).float().mean().item() == pytest.approx(0.27, abs=0.01)
    assert torch.equal(torch.bincount(noisy), torch.bincount(y))
    assert torch.equal(y, torch.arange(20_000) % 10)
    assert torch.equal(shuffle_labels(y, 0.0, torch.Generator().manual_seed(0)), y)
    assert (shuffle_labels(y, 1.0, torch.Generator().manual_seed(0)) != y).float().mean().item() == pytest.approx(
        0.9, abs=0.01)


def test_shuffle_labels_is_seeded_and_checks_p():
    y = torch.arange(1000) % 7
    a = shuffle_labels(y, 0.5, torch.Generator().manual_seed(3))
    b = shuffle_labels(y, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shuffle_labels(y, 1.5, torch.Generator())
