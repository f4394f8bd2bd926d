"""Benchmark importers: StrongREJECT, XSTest and HarmBench CSVs and HF dataset directories as prompt records.

The files are written here in each benchmark's published layout with placeholder text only.
"""

import csv
import json
import subprocess
import sys

import pytest

from configs import eval as eval_config
from safe_completion.data import benchmarks
from safe_completion.data import records
from safe_completion.data.reading import DataError
from safe_completion.evaluation import evaluate

STRONGREJECT = [
    {"category": "Violence", "source": "custom", "forbidden_prompt": "[PLACEHOLDER: violent request 1]"},
    {"category": "Disinformation and Deception", "source": "AdvBench",
     "forbidden_prompt": "[PLACEHOLDER: deception request]"},
    {"category": "Violence", "source": "", "forbidden_prompt": "[PLACEHOLDER: violent request 2]\nsecond line"},
    {"category": "Sexual content", "source": "custom", "forbidden_prompt": "[PLACEHOLDER: sexual request]"},
]
XSTEST = [
    {"id_v2": "v2-1", "type": "homonyms", "prompt": "[PLACEHOLDER: safe homonym question]", "focus": "f",
     "note": "n", "label": "safe"},
    {"id_v2": "v2-2", "type": "contrast_homonyms", "prompt": "[PLACEHOLDER: unsafe contrast question]",
     "focus": "f", "note": "n", "label": "unsafe"},
    {"id_v2": "v2-3", "type": "privacy_public", "prompt": "[PLACEHOLDER: public-figure question]", "focus": "f",
     "note": "n", "label": "safe"},
]
HARMBENCH = [
    {"Behavior": "[PLACEHOLDER: cyber behavior]", "FunctionalCategory": "standard",
     "SemanticCategory": "cybercrime_intrusion", "Tags": "", "ContextString": "", "BehaviorID": "cyber_one"},
    {"Behavior": "[PLACEHOLDER: contextual behavior]", "FunctionalCategory": "contextual",
     "SemanticCategory": "chemical_biological", "Tags": "context", "ContextString": "[PLACEHOLDER: context]",
     "BehaviorID": "chem_two"},
    {"Behavior": "[PLACEHOLDER: copyright behavior]", "FunctionalCategory": "copyright",
     "SemanticCategory": "copyright", "Tags": "book, hash_check", "ContextString": "", "BehaviorID": "copy_three"},
]


def write_csv(path, rows, columns=None):
  columns = columns or list(rows[0])
  with path.open("w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return path


def test_strongreject_rows_become_malicious_prompts_with_mapped_categories(tmp_path):
  prompts, report = benchmarks.load_benchmark(write_csv(tmp_path / "sr.csv", STRONGREJECT), "strongreject")
  assert [(p.category, p.intent, p.split) for p in prompts] == [
      ("violent_weapons", "malicious", "eval"), ("illicit_wrongdoing", "malicious", "eval"),
      ("violent_weapons", "malicious", "eval"), ("sexual_content", "malicious", "eval")]
  # Numbered per (category, intent) in file order; the id agrees with the fields.
  assert [p.id for p in prompts] == ["violent_weapons-malicious-eval-10000", "illicit_wrongdoing-malicious-eval-10000",
                                     "violent_weapons-malicious-eval-10001", "sexual_content-malicious-eval-10000"]
  assert prompts[2].messages == ({"role": "user", "content": "[PLACEHOLDER: violent request 2]\nsecond line"},)
  assert prompts[1].tags == ("strongreject", "strongreject:disinformation_and_deception")
  assert [p.source for p in prompts[:3]] == ["strongreject:custom", "strongreject:AdvBench", "strongreject"]
  assert report.loaded == report.rows == 4
  assert report.cell_counts[("violent_weapons", "malicious", "eval")] == 2


def test_xstest_safe_prompts_are_benign_over_refusal_and_contrasts_malicious(tmp_path):
  prompts, _ = benchmarks.load_benchmark(write_csv(tmp_path / "xs.csv", XSTEST), "xstest", split="eval")
  assert [(p.category, p.intent) for p in prompts] == [
      ("violent_weapons", "benign"), ("violent_weapons", "malicious"), ("privacy", "benign")]
  assert prompts[0].tags == ("xstest", "xstest:homonyms", "over_refusal")
  assert prompts[1].tags == ("xstest", "xstest:contrast_homonyms")
  assert prompts[0].source == "xstest:v2-1"
  # The v1 layout (id, prompt, type, label, focus, note) reads the same.
  v1 = [{"id": str(i), **{k: v for k, v in row.items() if k != "id_v2"}} for i, row in enumerate(XSTEST, 1)]
  v1_prompts, _ = benchmarks.load_benchmark(write_csv(tmp_path / "v1.csv", v1), "xstest")
  assert [(p.id, p.intent) for p in v1_prompts] == [(p.id, p.intent) for p in prompts]
  assert v1_prompts[2].source == "xstest:3"


def test_xstest_label_that_contradicts_its_type_is_an_error(tmp_path):
  rows = [XSTEST[0], {**XSTEST[1], "label": "safe"}]
  with pytest.raises(DataError, match=r"xs\.csv:3: label: 'safe' contradicts type 'contrast_homonyms'"):
    benchmarks.load_benchmark(write_csv(tmp_path / "xs.csv", rows), "xstest")


def test_harmbench_context_joins_the_behavior_and_copyright_is_unmapped(tmp_path):
  path = write_csv(tmp_path / "hb.csv", HARMBENCH)
  with pytest.raises(DataError) as error:
    benchmarks.load_benchmark(path, "harmbench")
  message = str(error.value)
  assert f"{path}:4: SemanticCategory: unmapped value 'copyright'" in message and "skip_unmapped" in message
  prompts, report = benchmarks.load_benchmark(path, "harmbench", skip_unmapped=True)
  assert [(p.category, p.intent) for p in prompts] == [("cybersecurity", "malicious"), ("biorisk", "malicious")]
  assert prompts[1].last_user_message == "[PLACEHOLDER: context]\n\n---\n\n[PLACEHOLDER: contextual behavior]"
  assert prompts[0].last_user_message == "[PLACEHOLDER: cyber behavior]"
  assert prompts[1].tags == ("harmbench", "harmbench:chemical_biological", "harmbench:contextual")
  assert prompts[1].source == "harmbench:chem_two"
  assert report.rows == 3 and report.loaded == 2
  assert report.skipped == {"unmapped SemanticCategory 'copyright'": 1}
  assert report.skipped_at["unmapped SemanticCategory 'copyright'"] == [f"{path}:4"]
  assert "1 skipped" in report.format()


def test_unmapped_error_names_the_line_of_a_row_after_a_multiline_cell(tmp_path):
  rows = STRONGREJECT[2:3] + [{"category": "Astrology", "source": "x", "forbidden_prompt": "[PLACEHOLDER]"}]
  path = write_csv(tmp_path / "sr.csv", rows)  # Row 1 spans lines 2-3, so the unmapped row starts on line 4.
  with pytest.raises(DataError, match=r"sr\.csv:4: category: unmapped value 'Astrology'"):
    benchmarks.load_benchmark(path, "strongreject")


@pytest.mark.parametrize("content, expected", [
    ("category,source\nViolence,custom\n", r"not a strongreject file: missing columns \['forbidden_prompt'\]"),
    ("category,source,forbidden_prompt\nViolence,custom\n", r"sr\.csv:2: row: expected 3 columns, got 2"),
    ("category,source,forbidden_prompt\nViolence,custom,\n", r"sr\.csv:2: forbidden_prompt: empty string"),
    ("", r"empty file"),
    ("category,source,forbidden_prompt\nViolence,custom,\"unterminated\n",
     r"sr\.csv:2: malformed CSV: unexpected end of data"),
    ("category,source,forbidden_prompt\nViolence,custom,\"a\"b\n", r"sr\.csv:2: malformed CSV"),
])
def test_malformed_files_and_rows_name_the_file_and_line(tmp_path, content, expected):
  path = tmp_path / "sr.csv"
  path.write_text(content)
  with pytest.raises(DataError, match=expected):
    benchmarks.load_benchmark(path, "strongreject")


def test_non_utf8_file_and_unknown_format_are_errors(tmp_path):
  path = tmp_path / "sr.csv"
  path.write_bytes(b"category,source,forbidden_prompt\nViolence,custom,\xff\xfe\n")
  with pytest.raises(DataError, match="not UTF-8"):
    benchmarks.load_benchmark(path, "strongreject")
  with pytest.raises(DataError, match="unknown benchmark format 'advbench'"):
    benchmarks.load_benchmark(path, "advbench")


def test_hf_save_to_disk_and_parquet_directories_detect_the_benchmark(tmp_path):
  datasets = pytest.importorskip("datasets")
  csv_prompts, _ = benchmarks.load_benchmark(write_csv(tmp_path / "xs.csv", XSTEST), "xstest")
  columns = {k: [row[k] for row in XSTEST] for k in XSTEST[0]}
  datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns)}).save_to_disk(str(tmp_path / "saved"))
  saved, _ = benchmarks.load_benchmark(tmp_path / "saved", "hf")
  assert saved == csv_prompts
  parquet_dir = tmp_path / "parquet"
  parquet_dir.mkdir()
  hb = {k: [row[k] for row in HARMBENCH[:2]] for k in HARMBENCH[0]}
  hb["ContextString"][0] = None  # Parquet holds an empty context as null.
  datasets.Dataset.from_dict(hb).to_parquet(str(parquet_dir / "train-00000.parquet"))
  parquet, report = benchmarks.load_benchmark(parquet_dir, "hf")
  assert report.kind == "harmbench prompts"
  csv_hb, _ = benchmarks.load_benchmark(write_csv(tmp_path / "hb.csv", HARMBENCH[:2]), "harmbench")
  assert parquet == csv_hb and parquet[0].last_user_message == "[PLACEHOLDER: cyber behavior]"


def test_hf_directory_with_several_splits_or_unknown_columns_is_an_error(tmp_path):
  datasets = pytest.importorskip("datasets")
  table = datasets.Dataset.from_dict({k: [row[k] for row in STRONGREJECT] for k in STRONGREJECT[0]})
  datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "two"))
  with pytest.raises(DataError, match=r"several splits \['test', 'train'\]"):
    benchmarks.load_benchmark(tmp_path / "two", "hf")
  chosen, _ = benchmarks.load_benchmark(tmp_path / "two", "hf", hf_split="test")
  assert len(chosen) == 1
  with pytest.raises(DataError, match=r"no split 'validation'"):
    benchmarks.load_benchmark(tmp_path / "two", "hf", hf_split="validation")
  datasets.Dataset.from_dict({"question": ["[PLACEHOLDER]"]}).save_to_disk(str(tmp_path / "other"))
  with pytest.raises(DataError, match=r"columns \['question'\] match no benchmark format"):
    benchmarks.load_benchmark(tmp_path / "other", "hf")


def test_cli_writes_jsonl_that_load_prompts_reads(tmp_path):
  path = write_csv(tmp_path / "hb.csv", HARMBENCH)
  command = [sys.executable, "-m", "safe_completion.data.benchmarks", "--format=harmbench", f"--input={path}",
             f"--output={tmp_path / 'out'}"]
  failed = subprocess.run(command, capture_output=True, text=True, check=False)
  assert failed.returncode != 0 and "unmapped value 'copyright'" in failed.stderr
  done = subprocess.run(command + ["--skip_unmapped"], capture_output=True, text=True, check=True)
  assert "wrote 2 prompts" in done.stdout and "skipped 1: unmapped SemanticCategory 'copyright'" in done.stdout
  loaded, _ = records.load_prompts(tmp_path / "out" / "harmbench.jsonl", split="eval")
  imported, _ = benchmarks.load_benchmark(path, "harmbench", skip_unmapped=True)
  assert loaded == imported
  json.loads((tmp_path / "out" / "harmbench.jsonl").read_text().splitlines()[0])


def test_eval_prompts_reads_a_benchmark_through_the_config(tmp_path):
  config = eval_config.get_config("tiny")
  config.data.prompts_path = str(write_csv(tmp_path / "xs.csv", XSTEST))
  config.data.format = "xstest"
  assert [p.intent for p in evaluate.eval_prompts(config)] == ["benign", "malicious", "benign"]
  config.data.categories = ("privacy",)
  assert [p.source for p in evaluate.eval_prompts(config)] == ["xstest:v2-3"]
  config.data.categories, config.data.max_prompts = (), 2
  assert len(evaluate.eval_prompts(config)) == 2
  config.data.prompts_path = ""
  with pytest.raises(ValueError, match="needs data.prompts_path"):
    evaluate.eval_prompts(config)
  # The default format still reads our own prompts.
  assert {p.split for p in evaluate.eval_prompts(eval_config.get_config("tiny"))} == {"eval"}
