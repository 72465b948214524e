"""main_knn.py end to end: any encoder checkpoint, one process and two (torchrun), the results file."""
import json

import pytest

import main_knn
from test_main_classification import launch_probe, needs_gloo
from util.cli import parse_args
from util.errors import UserError


def knn_argv(data, out, checkpoint, *extra):
    return ['--data_path', str(data), '--output_dir', str(out), '--checkpoint', str(checkpoint), '--model',
            'vit_tiny_patch8', '--input_size', '32', '--num_workers', '0', '--device', 'cpu', '--batch_size', '5',
            *extra]


def run(argv):
    return main_knn.main(parse_args(main_knn.get_args_parser(), main_knn.DEMO_DEFAULTS, argv))


def test_a_pretraining_checkpoint_gives_top1_top5_and_a_results_file(milan_checkpoint, tiny_data, tmp_path):
    stats = run(knn_argv(tiny_data, tmp_path, milan_checkpoint))
    assert 0 <= stats['acc1'] <= stats['acc5'] <= 100
    saved = json.loads((tmp_path / 'knn.json').read_text())
    assert (saved['acc1'], saved['acc5'], saved['k'], saved['temperature']) == (stats['acc1'], stats['acc5'], 20, 0.07)
    assert (saved['train_images'], saved['val_images']) == (32, 16)
    mean = run(knn_argv(tiny_data, tmp_path / 'mean', milan_checkpoint, '--feature', 'mean', '--k', '5',
                        '--train_subset', '12', '--val_subset', '8'))
    assert 0 <= mean['acc1'] <= 100
    assert json.loads((tmp_path / 'mean' / 'knn.json').read_text())['train_images'] == 12


@needs_gloo
def test_two_processes_give_the_numbers_of_one(milan_checkpoint, tiny_data, tmp_path):
    """Features extracted sharded over 2 processes and put back in dataset order: the same votes, 5-image batches
    over 16 and 32 images leaving the shards uneven."""
    one = run(knn_argv(tiny_data, tmp_path / 'one', milan_checkpoint))
    two = launch_probe(tmp_path, 'knn', knn_argv(tiny_data, tmp_path / 'two', milan_checkpoint))
    assert two == pytest.approx(one, abs=1e-9)


def test_bad_input_is_one_line(milan_checkpoint, tiny_data, tmp_path):
    with pytest.raises(UserError, match='no such file'):
        run(knn_argv(tiny_data, tmp_path, tmp_path / 'missing.pth'))
    with pytest.raises(UserError, match='does not fit this model'):
        run(knn_argv(tiny_data, tmp_path, milan_checkpoint, '--model', 'vit_small_patch16'))


def test_help_shows_only_the_flags_an_evaluation_reads():
    """The shared training flags stay accepted (a script may pass its recipe to every entry point) but out of
    --help, which would otherwise suggest that --epochs or --blr change a k-NN evaluation."""
    text = main_knn.get_args_parser().format_help()
    assert '--k K' in text and '--batch_size' in text and '--epochs' not in text and '--blr' not in text
    args = parse_args(main_knn.get_args_parser(), main_knn.DEMO_DEFAULTS, ['--epochs', '3', '--checkpoint', 'x'])
    assert args.epochs == 3
