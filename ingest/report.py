"""What an ingest run did, for the summary table, ``--json`` and the UI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class FileProblem:
    path: str
    reason: str


@dataclass
class IngestReport:
    collection: str = ""
    folder: str = ""
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    renamed_or_copied: int = 0  # content already stored under another name: linked, not re-embedded
    chunks_added: int = 0
    chunks_removed: int = 0
    bytes_parsed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    skipped: list[FileProblem] = field(default_factory=list)
    notes: list[FileProblem] = field(default_factory=list)

    @property
    def files_seen(self) -> int:
        return self.new + self.changed + self.unchanged + self.renamed_or_copied + len(self.skipped)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["files_seen"] = self.files_seen
        return out
