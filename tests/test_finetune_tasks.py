"""Task file readers and prediction writers: each format, each task, each bad input."""

import io
import json

import pytest

from budgetlm.errors import UserError
from budgetlm.finetune.tasks import Columns, read_task_file, write_predictions


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_headerless_csv_defaults_to_label_text(tmp_path):
    p = _write(tmp_path, "a.csv", '1,"a good, fine film"\n-1,bad film\nonly-one-column\n\n')
    data = read_task_file(p, "classify")
    assert [(e.label, e.text) for e in data.examples] == [("1", "a good, fine film"), ("-1", "bad film")]
    assert data.skipped == 1  # the one-column row is malformed


def test_csv_with_header_by_name_and_by_index(tmp_path):
    p = _write(tmp_path, "a.csv", "id,sentence,label\n1,hello there,pos\n2,go away,neg\n")
    data = read_task_file(p, "classify")
    assert [(e.text, e.label) for e in data.examples] == [("hello there", "pos"), ("go away", "neg")]
    data = read_task_file(p, "classify", columns=Columns(text="0", label="label"))
    assert data.examples[0].text == "1"


def test_tsv_pair_and_regress(tmp_path):
    p = _write(tmp_path, "a.tsv", "label\tsentence1\tsentence2\n0.5\ta cat\ta dog\nx\tbad\trow\n4\tone\ttwo\n")
    pair = read_task_file(p, "pair")
    assert [(e.text, e.text2, e.label) for e in pair.examples][0] == ("a cat", "a dog", "0.5")
    reg = read_task_file(p, "regress", columns=Columns(text2="sentence2"))
    assert [e.label for e in reg.examples] == [0.5, 4.0] and reg.skipped == 1  # 'x' is not a number
    headerless = _write(tmp_path, "b.tsv", "1\tfirst\tsecond\n")
    assert read_task_file(headerless, "pair").examples[0].text2 == "second"


def test_jsonl_by_field_and_tagging(tmp_path):
    p = _write(tmp_path, "a.jsonl", '{"review": "nice", "stars": "5"}\nnot json\n{"review": "meh", "stars": "2"}\n')
    data = read_task_file(p, "classify", columns=Columns(text="review", label="stars"))
    assert [e.label for e in data.examples] == ["5", "2"] and data.skipped == 1
    p = _write(tmp_path, "t.jsonl", json.dumps({"tokens": ["I", "run"], "tags": ["PRP", "VBP"]}) + "\n")
    ex = read_task_file(p, "tag").examples[0]
    assert ex.text == ["I", "run"] and ex.label == ["PRP", "VBP"]


def test_conll_and_tagged(tmp_path):
    p = _write(tmp_path, "a.conll", "-DOCSTART- -X- O\n\nJohn NNP B-PER\nruns VBZ O\n\nParis NNP B-LOC\n")
    data = read_task_file(p, "tag")
    assert [e.label for e in data.examples] == [["B-PER", "O"], ["B-LOC"]]
    assert read_task_file(p, "tag", columns=Columns(label="1")).examples[0].label == ["NNP", "VBZ"]
    p = _write(tmp_path, "a.txt", "The/DT 1/2/CD cats/NNS ./.\n\nRun/VB\n")
    data = read_task_file(p, "tag", fmt="tagged")
    assert data.examples[0].text == ["The", "1/2", "cats", "."] and data.examples[0].label == ["DT", "CD", "NNS", "."]
    assert len(data.examples) == 2


@pytest.mark.parametrize(
    "name,text,task,fmt,cols,message",
    [
        ("e.csv", "", "classify", None, None, "is empty"),
        ("e.csv", "\n \n", "classify", None, None, "is empty"),
        ("m.csv", "text,other\nhi,there\n", "classify", None, None, "no label column"),
        ("m.csv", "text,label\nhi,x\n", "classify", None, Columns(label="stars"), "label column 'stars' not found"),
        ("m.jsonl", '{"text": "a"}\n', "classify", None, None, "no label field"),
        ("t.txt", "The/DT cat sat/VBD\n", "tag", "tagged", None, "misaligned tagged token at line 1"),
        ("t.conll", "John B-PER\nruns\n", "tag", None, None, "misaligned CoNLL line 2"),
        ("x.dat", "a,b\n", "classify", None, None, "cannot tell the format"),
        ("c.conll", "a O\n", "classify", None, None, "use it with --task tag"),
    ],
)
def test_bad_input_is_a_user_error(tmp_path, name, text, task, fmt, cols, message):
    p = _write(tmp_path, name, text)
    with pytest.raises(UserError, match=message):
        read_task_file(p, task, fmt=fmt, columns=cols)


def test_unlabelled_input_and_prediction_writers(tmp_path):
    p = _write(tmp_path, "in.csv", "text\nhello\nbye\n")
    data = read_task_file(p, "classify", labelled=False)
    out = io.StringIO()
    write_predictions(data, ["pos", "neg"], "csv", "classify", out)
    assert out.getvalue() == "text,prediction\nhello,pos\nbye,neg\n"
    p = _write(tmp_path, "in2.csv", "1,hello\n0,bye\n")
    data = read_task_file(p, "classify", labelled=False)
    out = io.StringIO()
    write_predictions(data, ["0", "1"], "csv", "classify", out)
    assert out.getvalue() == "0,hello\n1,bye\n"
    p = _write(tmp_path, "in.txt", "The cat\n")
    data = read_task_file(p, "tag", fmt="tagged", labelled=False)
    out = io.StringIO()
    write_predictions(data, [["DT", "NN"]], "tagged", "tag", out)
    assert out.getvalue() == "The/DT cat/NN\n"
    out = io.StringIO()
    write_predictions(data, [["DT", "NN"]], "conll", "tag", out)
    assert out.getvalue() == "The\tDT\ncat\tNN\n\n"
    p = _write(tmp_path, "in.jsonl", '{"text": "hi", "id": 3}\n')
    data = read_task_file(p, "regress", labelled=False)
    out = io.StringIO()
    write_predictions(data, [0.25], "jsonl", "regress", out)
    assert json.loads(out.getvalue()) == {"text": "hi", "id": 3, "prediction": 0.25}
