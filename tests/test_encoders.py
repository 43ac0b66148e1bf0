"""The torch-only forward of the bundled MiniLM equals sentence-transformers' (so stored text embeddings keep
their meaning), and `adaptermix search` no longer imports sentence-transformers or transformers."""

import os
import subprocess
import sys

import numpy as np

from adaptermix.library.bert_encoder import BertSentenceEncoder, supports
from adaptermix.library.encoders import _bundled_minilm_path

TEXTS = ["Rewrite the date 2024-07-04 as month/day/year.", "", "a", "Write an SQL query that counts the users " * 30,
         "Ünïcödé and emoji 🙂 text", "Extract the email address: nina.harbor@school.edu"]


def test_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    folder = _bundled_minilm_path()
    assert supports(folder)
    expected = SentenceTransformer(folder, device="cpu", local_files_only=True).encode(
        TEXTS, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    got = BertSentenceEncoder(folder).encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_other_folders_go_to_sentence_transformers(tmp_path):
    assert not supports(tmp_path)
    (tmp_path / "modules.json").write_text("[1, 2]")
    assert not supports(tmp_path)


def test_search_imports_neither_sentence_transformers_nor_transformers(tmp_path, library, checkpoints):
    library.add_many(checkpoints["sql"].parent, progress=False)
    library.close()
    probe = ("import sys; from adaptermix.cli import main; code = main(['search', %r, 'degrees fahrenheit']); "
             "print(code, 'sentence_transformers' in sys.modules, 'transformers' in sys.modules)" % str(library.root))
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[-1] == "celsius" and lines[-1] == "0 False False", out.stdout + out.stderr
