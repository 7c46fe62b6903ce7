import sys, os; sys.path.insert(0, os.path.dirname(__file__))
import pytest
from test_revocation import test_revoked_key_is_refused_by_every_replica_within_two_seconds as revoke_test
from test_stream_disconnect import test_client_disconnect_mid_stream_is_billed_once_as_aborted as disc_test

pytestmark = pytest.mark.integration

@pytest.mark.parametrize("i", range(12))
def test_disc(marketplace, redis_client, i):
    disc_test(marketplace, redis_client)
    print("ledger", [f["completion_tokens"] + ":" + f["status"] for k in redis_client.scan_iter("*:ledger") for _, f in redis_client.xrange(k)])

@pytest.mark.parametrize("i", range(5))
def test_rev(marketplace, i):
    revoke_test(marketplace)
