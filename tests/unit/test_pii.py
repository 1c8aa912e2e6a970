"""PII and secrets become typed placeholders; look-alikes stay."""

from __future__ import annotations

from data_jobs.pii import PiiConfig, luhn_valid, scrub_pii


def test_each_kind_is_replaced_and_counted():
    text = (
        "Write to jane.doe@example.com or call +1 415-555-0132 or (028) 3822 1234. "
        "Server 203.0.113.7 and fe80:0000:0000:0000:0202:b3ff:fe1e:8329. Card 4111 1111 1111 1111. "
        'api_key = "a8f3Kz92LmQx77pT" and AKIAIOSFODNN7EXAMPLE and ghp_0123456789abcdefghijABCDEFGHIJ012345.'
    )
    scrubbed, counts = scrub_pii(text, PiiConfig())
    assert counts == {"email": 1, "phone": 2, "ip_address": 2, "credit_card": 1, "secret": 3}
    for placeholder in ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<CREDIT_CARD>", "<SECRET>"):
        assert placeholder in scrubbed
    assert "jane.doe" not in scrubbed and "4111" not in scrubbed and "AKIA" not in scrubbed
    assert 'api_key = "<SECRET>"' in scrubbed


def test_look_alikes_are_left_alone():
    text = (
        "Python 3.11.7 was released on 2023-12-04; version 1.2.3.4.5 is not an address. "
        "The number 4111 1111 1111 1112 fails the Luhn check. 1,234,567 rows. password = 'changeme'."
    )
    scrubbed, counts = scrub_pii(text, PiiConfig())
    assert scrubbed == text and not counts


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("5500005555555559")
    assert not luhn_valid("4111111111111112")


def test_kinds_can_be_switched_off():
    scrubbed, counts = scrub_pii("mail a@b.co from 10.0.0.1", PiiConfig(email=False, keep_private_ips=True))
    assert scrubbed == "mail a@b.co from 10.0.0.1" and not counts

