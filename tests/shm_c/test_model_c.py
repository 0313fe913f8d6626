"""The shm tests' hypothesis state machine (writer operations against a dict model), read
back through the compiled reader instead of the pure-Python one; a second C reader is
opened fresh for every check of `new_reader_sees_the_same`."""

from __future__ import annotations

from hypothesis.stateful import rule

from walcache.codec import decode_value, encode_key
from walcache.shm.creader import CReader

from shm.test_model import KEYS, MISSING, TableVsModel

from .helpers import requires_c

pytestmark = requires_c


class TableVsModelC(TableVsModel):
    def __init__(self) -> None:
        super().__init__()
        self.reader.close()
        self.reader = CReader(self.ns)  # type: ignore[assignment]

    @rule()
    def new_reader_sees_the_same(self) -> None:
        with CReader(self.ns) as other:
            for key in KEYS:
                assert other.get(encode_key(key)) == self._expected(encode_key(key))

    @rule()
    def get_many_matches_the_model(self) -> None:
        expected = {}
        for key in KEYS:
            e = self._expected(encode_key(key))
            if e is not None:
                expected[key] = decode_value(*e)
        assert self.reader.get_many(KEYS + ["absent"]) == expected
        for key in KEYS:
            assert self.reader.lookup(key, MISSING) == expected.get(key, MISSING)


TableVsModelC.TestCase.settings = TableVsModel.TestCase.settings
test_table_matches_dict_model_through_the_c_reader = TableVsModelC.TestCase
