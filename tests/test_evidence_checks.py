"""The evidence checks that let the chain say "I don't know" for on-topic questions whose
answer is not in the passages: the expected answer type, and the names a question is about."""

from __future__ import annotations

import pytest

from localgpt.evidence_checks import (
    EvidenceGap, evidence_gap, expected_answer_type, holds_answer_type, katakana_terms, missing_names, question_names,
)


@pytest.mark.parametrize("question, kind", [
    ("How many mirrors does Debian have?", "number"),
    ("Which TCP port does Squid listen on?", "number"),
    ("In which year did Guido announce Python?", "date"),
    ("On what date was Rich 1.0 released?", "date"),
    ("Which version of the kernel ships with Debian 12?", "version"),
    ("Where on disk are crontabs stored?", "path"),
    ("Which directory holds site data?", "path"),
    ("Debian 12 的冻结是从哪一天开始的？", "date"),
    ("一个软件包最少要在不稳定版里放几天？", "number"),
    ("DHCPv6 のデフォルトのリース時間は何秒ですか？", "number"),
    ("商用サポート契約は年間いくらかかりますか？", "number"),
    # Not typed: "when" (a time or an event answers it as often as a date), a directory *name*, how-tos.
    ("When does the bakery open on Sundays?", None),
    ("Debian が生まれたのはいつですか？", None),
    ("Where do notes go when debconf runs without interaction?", None),
    ("What directory name is commonly used for a virtual environment?", None),
    ("How do I activate a virtual environment?", None),
    ("rsyslog 怎样通过 TLS 加密转发日志？", None),
])
def test_expected_answer_type_follows_the_question_words(question, kind):
    assert expected_answer_type(question) == kind


def test_answer_types_are_found_in_sentences_but_not_the_questions_own_numbers():
    q = "Which Linux version does Debian 12 use by default?"
    assert not holds_answer_type("version", ["Debian 12 is the current stable release."], q)
    assert holds_answer_type("version", ["Debian 12 ships Linux 6.1."], q)
    assert holds_answer_type("number", ["Roses need six hours of sun."], "How many hours of sun?")
    assert holds_answer_type("number", ["每天浇水两次。"], "每天浇几次水？")
    assert holds_answer_type("date", ["It opened to traffic in 2004."])
    assert holds_answer_type("date", ["1993 年 8 月に始まりました。"])
    assert not holds_answer_type("date", ["It opened to traffic after a long review."])
    assert holds_answer_type("date", ["Backups run every Sunday night."])
    assert holds_answer_type("number", ["Security updates are installed daily."], "How often are updates installed?")
    assert holds_answer_type("path", ["They live in /var/spool/cron/crontabs."])
    assert not holds_answer_type("path", ["They live in the spool directory."])


def test_question_names_are_acronyms_mixed_case_digits_code_and_capitalised_words():
    assert question_names("Which SELinux policy type does Debian enable by default?") == ["SELinux", "Debian"]
    assert question_names("How do I shrink an ext4 filesystem?") == ["ext4"]
    assert question_names("Which TCP port does apt-cacher-ng listen on for Falcot's clients?") == [
        "TCP", "apt-cacher-ng", "Falcot"]
    assert question_names("How can I list network-facing programs?") == []  # an English compound
    assert question_names("Where does the user keep e.g. notes?") == []
    assert question_names("dirvish 能直接把备份上传到 Amazon S3 吗？") == ["Amazon", "S3"]
    # The first word of a question is capitalised anyway.
    assert question_names("Roses need how much sun?") == []


def test_missing_names_are_matched_without_case_or_possessive():
    assert missing_names("Does Falcot's proxy use Squid?", ["the falcot proxy", "SQUID config"]) == []
    assert missing_names("Does Debian enable SELinux?", ["Debian uses AppArmor."]) == ["SELinux"]


def test_katakana_terms_of_a_japanese_question_must_be_in_the_japanese_passages():
    q = "ISC DHCP サーバのフェイルオーバーはどう設定しますか？"
    assert katakana_terms(q) == ["サーバ", "フェイルオーバー"]
    passages = ["ISC DHCP サーバーの設定ファイルは /etc/dhcp/dhcpd.conf です。リース期間も設定できます。"]
    assert missing_names(q, passages) == ["フェイルオーバー"]  # サーバ = サーバー; failover is never mentioned
    gap = evidence_gap(q, passages, passages)
    assert gap == EvidenceGap("names", ("フェイルオーバー",)) and "フェイルオーバー" in gap.explain("ja")
    # A compound counts as mentioned by its parts; half-width kana are the same words.
    assert missing_names("ディスククォータを有効にするには？", ["クォータはディスク領域の制限です。"]) == []
    assert missing_names("ﾃﾞｨｽｸｸｫｰﾀを有効にするには？", ["ディスククォータを設定します。"]) == []
    # English passages (a cross-language answer) are not held to katakana words.
    assert missing_names("ディスククォータを有効にするには？", ["Disk quotas limit the space a user may use."]) == []


def test_evidence_gap_names_first_then_answer_type():
    assert evidence_gap("Does Debian enable SELinux?", [], ["Debian uses AppArmor."]) == EvidenceGap("names", ("SELinux",))
    gap = evidence_gap("How many cars cross the bridge?", ["The bridge spans the fjord."], ["The bridge spans the fjord."])
    assert gap == EvidenceGap("answer_type", ("number",))
    assert "no number" in gap.explain("en") and "数字" in gap.explain("zh") and "数値" in gap.explain("ja")
    assert evidence_gap("How many cars cross the bridge?", ["It carries 30,000 cars a day."], ["…"]) is None
