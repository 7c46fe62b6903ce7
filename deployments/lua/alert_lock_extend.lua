-- Extend an organization's alert-delivery lease before the next POST, only if this
-- deliverer still holds it; a deliverer that lost it stops sending that organization's alerts.
--
-- KEYS[1] tm:alert_lock:<org id>   string: the token of the deliverer holding the lease
-- ARGV[1] this deliverer's token
-- ARGV[2] the lease's new time to live, ms
--
-- Returns 1 when the lease was extended, 0 when it was not this deliverer's.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
