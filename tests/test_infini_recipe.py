"""experiments/infini_recipe.py at a tiny size: every stage trains, the greedy soup is made, the table is written."""
import json
import os

import pytest

from experiments import infini_recipe as experiment


TINY = ['--iters=2,2,2,2', '--fallback_iters=2', '--fallback_length=512', '--fallback_trials=1',
        '--n_train=32', '--long_length=512', '--soup_length=512', '--lengths=256,512',
        '--trials=1', '--depths=0,1']


def test_the_recipe_trains_every_stage_then_tests_its_soup_with_the_read_on_and_off(tmp_path, capsys):
    experiment.main([f'--out_dir={tmp_path}', *TINY])
    for name, *_ in experiment.STAGES + experiment.PARTS + experiment.FALLBACK:
        assert os.path.isfile(tmp_path / 's1' / name / 'ckpt.pt')
    greedy = json.load(open(tmp_path / 's1' / 'soup_greedy' / 'greedy.json'))
    assert 1 <= len(greedy['chosen']) <= 3 and len(greedy['scores']) == 5  # 3 parts, then 2 trial soups
    # two iterations find no held-out key, so stage 6 trains, and the one of the two that does better is tested
    assert greedy['accuracy'] < 1 and os.path.isfile(tmp_path / 's1' / 'sharp8_4k_long' / 'ckpt.pt')
    assert 'seed 1: held-out keys at 512 tokens: the soup 0%, stage 6 0%' in capsys.readouterr().out
    text = open(tmp_path / 'results.md').read()
    assert ', kept over stage 6;' in text  # both find no key: a tie keeps the soup
    assert '| 512 (2x) | 2 |' in text
    # everything is reused: a second run trains and chooses nothing, and writes the same table
    mtime = os.path.getmtime(tmp_path / 's1' / 'soup_greedy' / 'greedy.json')
    experiment.main([f'--out_dir={tmp_path}', *TINY])
    assert os.path.getmtime(tmp_path / 's1' / 'soup_greedy' / 'greedy.json') == mtime
    assert open(tmp_path / 'results.md').read() == text
    # other held-out prompts: the parts are chosen again
    experiment.main([f'--out_dir={tmp_path}', *TINY, '--soup_length=256', '--train=False'])
    assert json.load(open(tmp_path / 's1' / 'soup_greedy' / 'greedy.json'))['length'] == 256
    # without the fallback, the greedy soup is tested whatever it scored
    experiment.main([f'--out_dir={tmp_path}', *TINY, '--fallback=False', '--train=False'])
    assert '### Seed 1: soup of ' in open(tmp_path / 'results.md').read()
    # the held-out score of single runs, and nothing else
    experiment.main([f'--out_dir={tmp_path}', *TINY, '--score=rms_sharp8,sharp8_4k_long'])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('seed 1, sharp8_4k_long: ')
    with pytest.raises(SystemExit, match='does not exist'):
        experiment.main([f'--out_dir={tmp_path}', *TINY, '--score=sharp32'])


@pytest.mark.parametrize('flag, message', [('--iters=1,2', 'four positive counts'),
                                           ('--soup=best', "'greedy' or 'uniform'"),
                                           ('--trials=1,2', 'one per length')])
def test_bad_flags_are_one_line_errors(tmp_path, flag, message):
    with pytest.raises(SystemExit, match=message):
        experiment.main([f'--out_dir={tmp_path}', '--lengths=256,512,1024', '--trials=1', flag])
