"""flower_records.py: messages.SCHEMA dicts <-> Flower records, losslessly (flower_app.py's codec).

Per message kind an ArrayRecord of its tensors and a ConfigRecord of its string lists, and one
ConfigRecord "meta" of plain JSON (the round, a client's report). `unpack` refuses anything `pack`
does not write with messages.BadMessage, so a client's bytes cost that client its round and never
the server its run. `tamper` is a test hook (tests/test_flower.py) that makes a node hostile.
"""
import json
import os

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

import messages as M


def pack(msgs: dict, **meta) -> RecordDict:
    """{kind: SCHEMA message} (+ plain JSON values in `meta`) -> RecordDict. Per kind, an ArrayRecord
    of its tensors (a state_dict's entries as "field/key"; bf16 travels as its int16 bits) and a
    ConfigRecord of its string lists."""
    rd = RecordDict({"meta": ConfigRecord({"json": json.dumps(meta)})})
    for kind, msg in msgs.items():
        arrays, texts = ArrayRecord(), ConfigRecord()
        for field, v in msg.items():
            if isinstance(v, (dict, torch.Tensor)):
                for key, t in (v.items() if isinstance(v, dict) else [(None, v)]):
                    name = field if key is None else f"{field}/{key}"
                    t = t.detach().cpu().contiguous()
                    if t.dtype == torch.bfloat16:  # numpy has no bf16
                        t, name = t.view(torch.int16), name + "@bf16"
                    arrays[name] = Array(t.numpy())
            else:
                texts[field] = list(v)
        rd[f"{kind}.arrays"], rd[f"{kind}.texts"] = arrays, texts
    return rd


MAX_META_CHARS = 2**20  # a reply's meta (its report) is small; a larger one is refused unread


def unpack(rd: RecordDict) -> tuple[dict, dict]:
    """RecordDict -> (meta, {kind: SCHEMA message}), the inverse of `pack`; messages.BadMessage for
    records that are not what `pack` writes (no meta, meta that is not a JSON object, nested too deep
    or too large, a kind without its .texts record, arrays that are not tensors)."""
    try:
        text = rd.config_records["meta"]["json"]
        if not isinstance(text, str) or len(text) > MAX_META_CHARS:
            raise M.BadMessage(f"meta is not a JSON text of at most {MAX_META_CHARS} characters")
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise M.BadMessage(f"meta is a JSON {type(meta).__name__}, not an object")
        return meta, _unpack_messages(rd)
    except M.BadMessage:
        raise
    except RecursionError:
        raise M.BadMessage("the reply's meta is nested too deeply") from None
    except Exception as e:  # whatever else malformed records trip over: one line, the client's fault
        raise M.BadMessage(f"the reply's records cannot be read ({type(e).__name__}: {str(e)[:120]})") from None


def _unpack_messages(rd: RecordDict) -> dict:
    msgs = {}
    for key in rd:
        if not key.endswith(".arrays"):
            continue
        kind, msg = key[:-len(".arrays")], {}
        for name, a in rd.array_records[key].items():
            t = torch.from_numpy(a.numpy().copy())
            if name.endswith("@bf16"):
                t, name = t.view(torch.bfloat16), name[:-len("@bf16")]
            if "/" in name:
                field, sub = name.split("/", 1)
                msg.setdefault(field, {})[sub] = t
            else:
                msg[name] = t
        msg.update({f: list(v) for f, v in rd.config_records[f"{kind}.texts"].items()})
        msgs[kind] = msg
    return msgs


def record_bytes(rd: RecordDict) -> int:
    """Bytes of a message's records as Flower serializes them (arrays with their .npy headers, UTF-8 text)."""
    n = 0
    for rec in rd.values():
        if isinstance(rec, ArrayRecord):
            n += sum(len(a.data) for a in rec.values())
        else:
            n += sum(len(s.encode()) for v in rec.values() for s in (v if isinstance(v, list) else [v]))
    return n


def tamper(rd: RecordDict, stage: str, rnd: int) -> RecordDict:
    """A test hook: with LADA_HOSTILE=1 in a SuperNode's environment its client lies in round 1 (its
    report claims the LLM's and slm1's accuracy are 0.99) and sends meta that is a JSON list in round 2;
    without it, `rd` unchanged."""
    if os.environ.get("LADA_HOSTILE") != "1" or stage == "setup":
        return rd
    meta = json.loads(rd.config_records["meta"]["json"])
    if rnd == 1 and "eval" in meta.get("report", {}):
        ev = meta["report"]["eval"]
        for who in ("llm", "slm1"):
            ev["accuracy"][who] = ev["strict"][who] = 0.99
            ev["eval_n"][who] = 4
        rd["meta"] = ConfigRecord({"json": json.dumps(meta)})
    elif rnd == 2:
        rd["meta"] = ConfigRecord({"json": json.dumps([meta])})
    return rd
