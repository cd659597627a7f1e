"""The benchmark corpus's PET/CT studies: as many at any corpus size, the rest unchanged."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import PositronEmissionTomographyImageStorage

from benchmarks import corpus


@given(st.integers(1, 400), st.integers(1, 4), st.data())
def test_pet_ct_studies_are_as_many_as_asked_and_spread(patients: int, studies: int,
                                                         data: st.DataObject) -> None:
    count = patients * studies
    pet_ct = data.draw(st.integers(0, count))
    chosen = corpus.pet_ct_studies(corpus.Parameters(patients, studies, 1, 1, 0, pet_ct))
    assert len(chosen) == pet_ct
    assert all(1 <= p <= patients and 1 <= s <= studies for p, s in chosen)
    if pet_ct < count:
        assert (1, 1) not in chosen  # the study the per-study queries name


def _datasets(root: Path) -> dict[str, object]:
    return {str(f.relative_to(root)): dcmread(f) for f in sorted(root.glob("P*/ST*/SE*/*.dcm"))}


def test_pet_ct_studies_hold_pet_series_and_leave_the_rest_as_it_was(tmp_path: Path) -> None:
    shape = dict(patients=5, studies=2, series=3, instances=2, seed=3)
    corpus.ensure(tmp_path / "plain", corpus.Parameters(**shape), quiet=True)
    plain = _datasets(tmp_path / "plain")
    manifest = corpus.ensure(tmp_path / "pet", corpus.Parameters(**shape, pet_ct=2), quiet=True)
    pet = _datasets(tmp_path / "pet")
    assert manifest["modalities"]["PT"] == 2 * 2 * 2  # two studies, two PT series of two
    assert plain.keys() == pet.keys()
    pet_studies = {f"P{p:04d}/ST{s:02d}" for p, s in corpus.pet_ct_studies(
        corpus.Parameters(**shape, pet_ct=2))}
    for name, ds in pet.items():
        if name[:10] in pet_studies:
            series = int(name.split("/")[2][2:])
            assert ds.Modality == ("CT" if series == 1 else "PT")
            if ds.Modality == "PT":
                assert ds.SOPClassUID == PositronEmissionTomographyImageStorage
                assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        else:
            assert ds == plain[name], name
