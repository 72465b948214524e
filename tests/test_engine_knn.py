"""engine_knn.py: the weighted k-NN vote (DINO's protocol) against hand-computed numbers, and feature extraction
in dataset order."""
import math

import torch
from torch.utils.data import Dataset

import engine_knn
from util.errors import UserError


def test_votes_are_the_temperature_weighted_similarities_of_the_k_nearest():
    """Two classes, 4 training features; k=3 picks the 3 most similar, each voting exp(cos / T) for its class."""
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    val = torch.tensor([[0.6, 0.8]])
    votes = engine_knn.knn_votes(train, labels, val, num_classes=2, k=3, temperature=0.5)
    cos = [0.6, 0.96, 0.8, -0.6]  # val . train
    weight = [math.exp((c - 1) / 0.5) for c in cos]  # exp(cos / T), scaled by exp(-1 / T)
    expected = [weight[0], weight[1] + weight[2]]  # train 3 is the 4th nearest
    torch.testing.assert_close(votes, torch.tensor([expected]))
    hot = engine_knn.knn_votes(train, labels, val, num_classes=2, k=3, temperature=0.01)
    cold = engine_knn.knn_votes(train, labels, val, num_classes=2, k=3, temperature=100.0)
    assert hot[0, 1] / hot[0].sum() > 0.999  # a low temperature: the nearest decides
    torch.testing.assert_close(cold[0] / cold[0].sum(), torch.tensor([1 / 3, 2 / 3]), atol=0.01, rtol=0)  # a count


def test_k_beyond_the_training_set_uses_all_of_it_and_chunks_agree():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    val = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (30,), generator=g)
    whole = engine_knn.knn_votes(train, labels, val, 5, k=7, temperature=0.07)
    torch.testing.assert_close(engine_knn.knn_votes(train, labels, val, 5, k=7, temperature=0.07, chunk=16), whole)
    everything = engine_knn.knn_votes(train, labels, val, 5, k=100, temperature=0.07)
    expected = torch.zeros(50, 5).index_add_(1, labels, ((val @ train.T - 1) / 0.07).exp())
    torch.testing.assert_close(everything, expected)


def test_top1_top5_and_ties_go_to_the_lower_class():
    votes = torch.tensor([[1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.5],   # label 1: top-1
                          [2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # a tie between 0 and 1: 0 ranks first
                          [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0],   # label 4: 5th, top-5 only
                          [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0]])  # label 5: 6th, neither
    stats = engine_knn.top_k_accuracy(votes, torch.tensor([1, 1, 4, 5]))
    assert stats == {'acc1': 25.0, 'acc5': 75.0}
    assert engine_knn.top_k_accuracy(votes[1:2], torch.tensor([0]))['acc1'] == 100.0


class Points(Dataset):
    """Images that are their own features: the i-th is a 2-vector at angle i."""

    def __init__(self, count):
        self.samples = [(f'p{i}', i % 3) for i in range(count)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return torch.tensor([math.cos(i), math.sin(i)]) * (i + 1), self.samples[i][1]


def test_extract_gives_normalised_features_in_dataset_order_and_subsets_spread():
    points = Points(11)
    features, readable = engine_knn.extract(lambda x: x, points, 4, 0, torch.device('cpu'), 'fp32')
    assert readable.all()
    expected = torch.stack([torch.tensor([math.cos(i), math.sin(i)]) for i in range(11)])
    torch.testing.assert_close(features, expected)
    subset = engine_knn.spread_subset(points, 4)
    assert list(subset.indices) == [0, 2, 5, 8] and engine_knn.labels_of(subset).tolist() == [0, 2, 2, 2]
    assert engine_knn.spread_subset(points, 20) is points


class SomeUnreadable(Points):
    def __getitem__(self, i):
        if i in (0, 3):
            raise UserError(f'cannot read image p{i}')
        return super().__getitem__(i)


def test_unreadable_images_are_marked_and_left_out_of_the_vote():
    """A corrupt file in a k-NN set (the pretraining monitor reads train/ and val/) is left out, not fatal."""
    data = SomeUnreadable(9)
    features, readable = engine_knn.extract(lambda x: x, data, 4, 0, torch.device('cpu'), 'fp32')
    assert readable.tolist() == [False, True, True, False, True, True, True, True, True]
    assert not features[0].any() and not features[3].any()
    stats = engine_knn.knn_evaluate(lambda x: x, data, data, 3, 1, 0.07, 4, 0, torch.device('cpu'), 'fp32')
    assert stats['acc1'] == 100.0  # each readable image is its own nearest neighbour
