import pytest
import torch

from gaze_ext import GazeLayout, Visual, build_batch_layout, build_layout, stack_layouts, validate_layout


def regions_of(layout, b=None):
    ptr = layout.region_ptr if b is None else layout.region_ptr[b]
    tokens = layout.region_tokens if b is None else layout.region_tokens[b]
    return [tokens[ptr[r]: ptr[r + 1]].tolist() for r in range(ptr.numel() - 1)]


def test_image_with_edge_regions():
    layout = build_layout([(5, 1, 7, 13)], 100)
    regions = regions_of(layout)
    assert [len(r) for r in regions] == [36, 36, 6, 6, 6, 1]
    assert regions[0] == [5 + row * 13 + col for row in range(6) for col in range(6)]
    assert regions[-1] == [5 + 6 * 13 + 12]
    assert layout.region_pos.tolist() == [max(r) for r in regions]
    in_regions = {p for r in regions for p in r}
    assert sorted(in_regions) == list(range(5, 5 + 91))
    assert layout.fixed_tokens.tolist() == [p for p in range(100) if p not in in_regions]
    assert all(t.dtype == torch.int32 for t in layout[:4]) and layout.num_keys == 100
    validate_layout(layout)


def test_video_regions_span_frames_and_several_visuals():
    layout = build_layout([Visual(0, 3, 4, 4), (60, 1, 2, 3)], 70, region_shape=(2, 4, 2))
    regions = regions_of(layout)
    # 3 frames in time blocks of 2 (2 + 1), 1 row block, 2 column blocks; then the 2x3
    # image in column blocks of 2 + 1
    assert [len(r) for r in regions] == [16, 16, 8, 8, 4, 2]
    assert regions[0] == sorted([t * 16 + h * 4 + w for t in range(2) for h in range(4)
                                 for w in range(2)])
    assert regions[4:] == [[60, 61, 63, 64], [62, 65]]
    assert layout.fixed_tokens.tolist() == list(range(48, 60)) + list(range(66, 70))
    validate_layout(layout)


def test_builder_puts_the_layout_on_the_device_asked_for():
    layout = build_layout([(1, 1, 2, 2)], 8, region_shape=(1, 2, 2), device="meta")
    assert {t.device.type for t in layout[:4]} == {"meta"} and layout.num_keys == 8
    assert build_layout([(1, 1, 2, 2)], 8).region_ptr.device.type == "cpu"
    batch = build_batch_layout([([(1, 1, 2, 2)], 8), ([], 3)], region_shape=(1, 2, 2),
                               device="meta")
    assert {t.device.type for t in batch[:4]} == {"meta"} and batch.num_keys == 8


def test_explicit_fixed_tokens_and_no_visuals():
    layout = build_layout([], 5, fixed_tokens=[4, 0, 2])
    assert layout.num_regions == 0 and layout.region_ptr.tolist() == [0]
    assert layout.fixed_tokens.tolist() == [4, 0, 2]
    validate_layout(layout)


@pytest.mark.parametrize("visuals, seq_len, match", [
    ([(0, 1, 4, 4), (10, 1, 2, 2)], 30, "overlaps"),
    ([(20, 1, 4, 4)], 30, "past seq_len"),
    ([(0, 0, 4, 4)], 30, ">= 1"),
])
def test_builder_rejects_bad_visuals(visuals, seq_len, match):
    with pytest.raises(ValueError, match=match):
        build_layout(visuals, seq_len)


@pytest.mark.parametrize("args, match", [
    (dict(seq_len=-1), "seq_len must be an int"),
    (dict(seq_len=2**31), "seq_len must be an int"),  # (before allocating 2^31 positions)
    (dict(seq_len=40.0), "seq_len must be an int"),
    (dict(region_shape=(2, 3)), "3 positive ints"),
    (dict(region_shape=(1, 2.5, 3)), "3 positive ints"),
    (dict(region_shape=(1, 0, 3)), "3 positive ints"),
    (dict(visuals=[(0.5, 1, 6, 6)]), "must be ints"),
    (dict(fixed_tokens=[38, 40]), r"outside \[-1, 40\)"),
    (dict(fixed_tokens=[-2]), r"outside \[-1, 40\)"),
    (dict(fixed_tokens=[38, 3, 35]), r"positions \[3, 35\] are both in a region and fixed"),
    (dict(fixed_tokens=[38, 0]), r"positions \[0\] are both in a region and fixed"),
    (dict(fixed_tokens=[38, -1, 39, -1, 38]), r"lists positions \[38\] more than once"),
    (dict(fixed_tokens=[36.0]), "integer positions"),
])
def test_builder_rejects_bad_arguments(args, match):
    """Named errors before anything is allocated or handed to the ops; fixed tokens inside
    a visual would break the ops' rule that a position is fixed or in a region, not both."""
    kwargs = {"visuals": [(0, 1, 6, 6)], "seq_len": 40, **args}
    with pytest.raises(ValueError, match=match):
        build_layout(**kwargs)


def test_builder_takes_fixed_tokens_with_padding():
    assert build_layout([(0, 1, 6, 6)], 40, fixed_tokens=[39, -1, 36]).fixed_tokens.tolist() == [
        39, -1, 36]
    assert build_layout([], 0, fixed_tokens=[-1]).fixed_tokens.tolist() == [-1]  # padding only


def test_ragged_batch_is_padded():
    batch = build_batch_layout([([(0, 1, 6, 6)], 40), ([(2, 1, 12, 6), (80, 1, 6, 6)], 120)])
    assert batch.batched and batch.num_keys == 120
    assert batch.region_ptr.shape == (2, 4) and batch.region_pos.shape == (2, 3)
    assert batch.region_ptr[0].tolist() == [0, 36, 36, 36]  # two empty padding regions
    assert (batch.fixed_tokens[0, 4:] == -1).all()
    assert regions_of(batch, 1) == regions_of(build_layout([(2, 1, 12, 6), (80, 1, 6, 6)], 120))
    validate_layout(batch)


def test_stack_rejects_batched_and_empty():
    single = build_layout([(0, 1, 2, 2)], 8)
    with pytest.raises(ValueError, match="at least one layout"):
        stack_layouts([])
    with pytest.raises(ValueError, match="unbatched"):
        stack_layouts([stack_layouts([single])])


def good_layout():
    return build_layout([(1, 1, 3, 4)], 16, region_shape=(1, 2, 2))


@pytest.mark.parametrize("field, value, match", [
    ("region_ptr", lambda t: t.long(), "int32"),
    ("region_ptr", lambda t: t + 1, "start at 0"),
    ("region_ptr", lambda t: torch.tensor([0, 4, 2, 10, 12], dtype=torch.int32),
     "decreases at region 1"),
    ("region_ptr", lambda t: torch.tensor([0, 4, 4, 2, 12], dtype=torch.int32),
     "decreases at region 2"),  # an empty region before it is no decrease
    ("region_ptr", lambda t: torch.tensor([0, 4, 8, 10, 13], dtype=torch.int32), "runs past"),
    ("region_tokens", lambda t: t + 16, "outside"),
    ("fixed_tokens", lambda t: torch.cat([t, torch.tensor([16], dtype=torch.int32)]), "outside"),
    ("fixed_tokens", lambda t: torch.cat([t, torch.tensor([1], dtype=torch.int32)]),
     "both in a region and fixed"),
    ("region_tokens", lambda t: torch.cat([t[:4], t[:1], t[5:]]), r"\[1\] are listed in more"),
    ("region_tokens", lambda t: torch.cat([t[:1], t[:1], t[2:]]), r"\[1\] are listed in more"),
    ("fixed_tokens", lambda t: torch.cat([t, t[1:2], torch.tensor([-1, -1], dtype=torch.int32)]),
     r"fixed_tokens lists positions \[13\] more than once"),
    ("fixed_tokens", lambda t: torch.cat([t, t[:1]]), r"lists positions \[0\] more than once"),
    ("region_pos", lambda t: t - 1, "largest position"),
    ("region_pos", lambda t: t[:-1], "entries"),
])
def test_validator_finds_each_problem(field, value, match):
    layout = good_layout()
    bad = layout._replace(**{field: value(getattr(layout, field))})
    with pytest.raises(ValueError, match=match):
        validate_layout(bad)


def test_validator_checks_batch_consistency():
    layout = stack_layouts([good_layout(), good_layout()])
    with pytest.raises(ValueError, match="batch sizes"):
        validate_layout(layout._replace(fixed_tokens=layout.fixed_tokens[:1]))
    with pytest.raises(ValueError, match="1-D, or 2-D"):
        validate_layout(layout._replace(fixed_tokens=layout.fixed_tokens[0]))
    assert isinstance(layout, GazeLayout)


def test_frames_with_a_stride_leave_room_for_context_tokens():
    # 3 frames of 2x3 tokens, each followed by 2 context tokens; regions span 2 frames
    layout = build_layout([Visual(1, 3, 2, 3, frame_stride=8)], 26, region_shape=(2, 2, 2))
    regions = regions_of(layout)
    frame = lambda f: [1 + 8 * f + y * 3 + x for y in range(2) for x in range(3)]  # noqa: E731
    assert regions[0] == sorted(frame(0)[0:2] + frame(0)[3:5] + frame(1)[0:2] + frame(1)[3:5])
    assert sorted(p for r in regions for p in r) == sorted(frame(0) + frame(1) + frame(2))
    context = [7, 8, 15, 16, 23, 24]
    assert set(context) <= set(layout.fixed_tokens.tolist())
    validate_layout(layout)
    with pytest.raises(ValueError, match="frame_stride"):
        build_layout([Visual(0, 2, 2, 3, frame_stride=4)], 20)


def test_visuals_may_end_exactly_at_seq_len():
    # an image whose last token is the last position; frames with a stride whose last frame
    # has no context tokens after it (the stride counts only between frames)
    image = build_layout([(2, 1, 2, 3)], 8)
    assert sorted(p for r in regions_of(image) for p in r) == list(range(2, 8))
    assert image.fixed_tokens.tolist() == [0, 1]
    video = build_layout([Visual(0, 2, 2, 2, frame_stride=5)], 9, region_shape=(2, 2, 2))
    assert regions_of(video) == [[0, 1, 2, 3, 5, 6, 7, 8]]
    assert video.fixed_tokens.tolist() == [4]
    validate_layout(image)
    validate_layout(video)


@pytest.mark.parametrize("visuals, region_shape, match", [
    ([(-1, 1, 2, 2)], (1, 6, 6), ">= 0"),
    ([(0, 1, 2, 2)], (1, 0, 2), "positive"),
])
def test_builder_rejects_negative_offsets_and_empty_region_shapes(visuals, region_shape, match):
    with pytest.raises(ValueError, match=match):
        build_layout(visuals, 10, region_shape=region_shape)


def test_batch_builder_takes_explicit_fixed_tokens():
    batch = build_batch_layout([([(2, 1, 2, 2)], 10, [0, 7]), ([(0, 1, 2, 2)], 6)],
                               region_shape=(1, 2, 2))
    assert batch.fixed_tokens[0].tolist() == [0, 7]
    assert batch.fixed_tokens[1].tolist() == [4, 5]
    assert batch.region_pos[1].tolist() == [3]
    validate_layout(batch)


def test_ragged_batch_pads_regions_with_position_zero():
    batch = build_batch_layout([([(0, 1, 6, 6)], 40), ([(2, 1, 12, 6), (80, 1, 6, 6)], 120)])
    assert batch.region_pos[0].tolist() == [35, 0, 0]


def test_validator_ignores_region_tokens_past_the_last_region():
    # a short sample's region_tokens are padded (with 0 by stack_layouts, or any value in a
    # hand-made layout): padding is not a position, so position 0 may be fixed
    batch = build_batch_layout([([(1, 1, 2, 2)], 8), ([(0, 1, 2, 4)], 8)], region_shape=(1, 2, 2))
    assert batch.region_tokens[0, 4:].tolist() == [0] * 4 and batch.fixed_tokens[0, 0] == 0
    validate_layout(batch)
    single = good_layout()
    validate_layout(single._replace(
        region_tokens=torch.cat([single.region_tokens, torch.tensor([-5, 99], dtype=torch.int32)])))


def test_validator_bounds_positions_by_num_keys():
    layout = good_layout()  # region positions up to 12, N = 16
    with pytest.raises(ValueError, match=r"outside \[0, 12\)"):
        validate_layout(layout, num_keys=12)
    tokens = layout.region_tokens.clone()
    tokens[-1] = 16  # == N: one past the last key
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        validate_layout(layout._replace(region_tokens=tokens))
    with pytest.raises(ValueError, match=r"outside \[-1, 16\)"):
        validate_layout(layout._replace(
            fixed_tokens=torch.cat([layout.fixed_tokens, torch.tensor([-2], dtype=torch.int32)])))


def test_validator_rejects_tensors_on_another_device():
    layout = good_layout()
    with pytest.raises(ValueError, match="fixed_tokens is on meta"):
        validate_layout(layout._replace(fixed_tokens=layout.fixed_tokens.to("meta")))
