"""EpisodeSampler: N-way K-shot meta-batches, per-task label remapping, determinism, the fixed
evaluation set, class-disjoint splits, bad arguments."""
import pytest
import torch

from metafast.data.episodes import EVAL_EPISODES, EpisodeSampler, ImageSplit, class_overlap


def make_split(num_classes=7, per_class=(5, 6, 9), shape=(1, 4, 3), name="toy"):
    """Class c holds images whose every pixel encodes (c, i): value 10*c + i, so any image tells
    its class and identity. Counts vary per class (odd, unequal)."""
    imgs, labels = [], []
    for c in range(num_classes):
        n = per_class[c % len(per_class)]
        for i in range(n):
            imgs.append(torch.full(shape, 10 * c + i, dtype=torch.uint8))
            labels.append(c)
    perm = torch.randperm(len(labels))  # storage order must not matter
    return ImageSplit(torch.stack(imgs)[perm], torch.tensor(labels)[perm], [f"c{c}" for c in range(num_classes)], name)


def decode(x):
    """pixel value -> (class, image id) for images built by make_split (pixels in [0, 1])."""
    v = torch.round(x.flatten(-3)[..., 0].double() * 255).long()
    return v // 10, v % 10


@pytest.mark.parametrize("ways,shots,queries,T", [(5, 1, 3, 4), (3, 2, 2, 7), (7, 1, 0, 1)])
def test_episode_contents(ways, shots, queries, T):
    split = make_split()
    s = EpisodeSampler(split, ways, shots, queries, seed=3)
    ep = s.sample(T)
    C, H, W = split.image_shape
    assert ep.support_x.shape == (T, ways * shots, C, H, W) and ep.support_x.dtype == torch.float32
    assert ep.query_x.shape == (T, ways * queries, C, H, W)
    assert ep.support_y.shape == (T, ways * shots) and ep.support_y.dtype == torch.int64
    assert ep.classes.shape == (T, ways)
    for t in range(T):
        cls = ep.classes[t]
        assert len(set(cls.tolist())) == ways, "classes of a task must be distinct"
        sc, sid = decode(ep.support_x[t])
        qc, qid = decode(ep.query_x[t])
        # label j of task t is the split class classes[t, j], in support and query alike
        assert torch.equal(cls[ep.support_y[t]], sc)
        assert torch.equal(cls[ep.query_y[t]], qc)
        assert sorted(ep.support_y[t].tolist()) == sorted(list(range(ways)) * shots)
        # no image is both support and query, nor repeated
        ids = list(zip(sc.tolist(), sid.tolist())) + list(zip(qc.tolist(), qid.tolist()))
        assert len(set(ids)) == len(ids)


def test_normalisation_and_dtype(assert_close):
    split = make_split(shape=(3, 2, 2))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    s = EpisodeSampler(split, 2, 1, 1, dtype=torch.float64, mean=mean, std=std, seed=0)
    plain = EpisodeSampler(split, 2, 1, 1, dtype=torch.float64, seed=0)
    a, b = s.sample(3), plain.sample(3)
    expect = (b.support_x - torch.tensor(mean, dtype=torch.float64).view(1, 1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(1, 1, 3, 1, 1)
    assert a.support_x.dtype == torch.float64
    assert_close(a.support_x, expect, 1e-12, 1e-12, "normalised support")
    assert_close(b.support_x, torch.round(b.support_x * 255) / 255, 1e-12, 0, "pixels / 255")


def test_deterministic_and_seeded():
    split = make_split()
    a = EpisodeSampler(split, 4, 2, 1, seed=11).sample(5)
    b = EpisodeSampler(split, 4, 2, 1, seed=11).sample(5)
    c = EpisodeSampler(split, 4, 2, 1, seed=12).sample(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.support_x, c.support_x)
    # resume: the generator state round-trips
    s = EpisodeSampler(split, 4, 2, 1, seed=11)
    s.sample(2)
    state = s.state_dict()
    nxt = s.sample(3)
    s2 = EpisodeSampler(split, 4, 2, 1, seed=0)
    s2.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(nxt, s2.sample(3)))


def test_all_classes_and_images_get_drawn():
    split = make_split(num_classes=6, per_class=(4,))
    s = EpisodeSampler(split, 3, 1, 1, seed=0)
    ep = s.sample(200)
    assert set(ep.classes.flatten().tolist()) == set(range(6))
    c, i = decode(torch.cat([ep.support_x, ep.query_x], 1).flatten(0, 1).unsqueeze(0))
    assert len(set(zip(c.flatten().tolist(), i.flatten().tolist()))) == 24


def test_fixed_episodes_are_fixed_and_batch_independent():
    split = make_split()
    s1 = EpisodeSampler(split, 3, 1, 2, seed=1)
    s2 = EpisodeSampler(split, 3, 1, 2, seed=99)
    s2.sample(4)  # training draws must not shift the evaluation set
    big = list(s1.fixed_episodes(batch=EVAL_EPISODES))
    small = list(s2.fixed_episodes(batch=7))
    assert len(big) == 1 and len(small) == -(-EVAL_EPISODES // 7)
    assert big[0].support_x.shape[0] == EVAL_EPISODES
    for field in range(5):
        assert torch.equal(big[0][field], torch.cat([b[field] for b in small]))
    other = next(s1.fixed_episodes(count=10, seed=5))
    assert not torch.equal(other.classes, big[0].classes[:10])


def test_splits_never_share_classes():
    """Episodes of each split only contain that split's classes (fixture splits built class-disjoint)."""
    from metafast.data.splits import load_split

    for ds in ("omniglot", "miniimagenet", "cifarfs", "fc100"):
        tr, va, te = (load_split(ds, s) for s in ("train", "val", "test"))
        assert not class_overlap(tr, va) and not class_overlap(tr, te) and not class_overlap(va, te)
    train, test = make_split(num_classes=5), make_split(num_classes=4)
    test.class_names = [f"t{c}" for c in range(4)]
    used = {train.class_names[c] for c in EpisodeSampler(train, 3, 1, 1).sample(20).classes.flatten().tolist()}
    used_test = {test.class_names[c] for c in EpisodeSampler(test, 3, 1, 1).sample(20).classes.flatten().tolist()}
    assert used <= set(train.class_names) and not used & used_test


def test_bad_arguments():
    split = make_split(num_classes=4, per_class=(3,))
    with pytest.raises(ValueError, match="ways: .* 4 classes"):
        EpisodeSampler(split, 5, 1, 1)
    with pytest.raises(ValueError, match="shots \\+ queries"):
        EpisodeSampler(split, 2, 2, 2)
    with pytest.raises(ValueError, match="shots"):
        EpisodeSampler(split, 2, 0, 1)
    with pytest.raises(TypeError, match="split"):
        EpisodeSampler(split.images, 2, 1, 1)
    with pytest.raises(ValueError, match="mean"):
        EpisodeSampler(split, 2, 1, 1, mean=(0.5, 0.5))
    with pytest.raises(TypeError, match="dtype"):
        EpisodeSampler(split, 2, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="images"):
        ImageSplit(split.images.float(), split.labels, split.class_names)
    with pytest.raises(ValueError, match="labels"):
        ImageSplit(split.images, split.labels[:-1], split.class_names)
    with pytest.raises(ValueError, match="class ids"):
        ImageSplit(split.images, split.labels + 1, split.class_names)
    with pytest.raises(ValueError, match="num_tasks"):
        EpisodeSampler(split, 2, 1, 1).sample(0)


def test_feeds_batched_maml():
    from metafast import BatchedMAML
    from metafast.models import Conv4

    split = make_split(num_classes=6, shape=(1, 28, 28))
    ep = EpisodeSampler(split, 5, 1, 2, seed=0).sample(2)
    maml = BatchedMAML(Conv4.omniglot(5), 0.4, 1, loss="cross_entropy")
    out = maml(ep.support_x, ep.support_y, ep.query_x, ep.query_y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.task_accuracies.shape == (2,)


@pytest.mark.gpu
def test_episodes_gathered_on_gpu_match_cpu():
    split = make_split(shape=(3, 5, 5))
    cpu = EpisodeSampler(split, 4, 2, 3, seed=7).sample(6)
    gpu = EpisodeSampler(split, 4, 2, 3, device="cuda", seed=7)
    assert gpu.images.is_cuda
    ep = gpu.sample(6)
    assert ep.support_x.is_cuda and ep.query_y.is_cuda
    for a, b in zip(cpu, ep):
        assert torch.equal(a, b.cpu())
