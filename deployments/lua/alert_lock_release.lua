-- Release an organization's alert-delivery lease, only if this deliverer still holds it.
--
-- A lease that expired (a pass that ran past it) may already belong to another deliverer;
-- deleting it blindly would let a third one in beside that one, so the token is compared
-- and the key deleted in this one script.
--
-- KEYS[1] tm:alert_lock:<org id>   string: the token of the deliverer holding the lease
-- ARGV[1] this deliverer's token
--
-- Returns 1 when the lease was released, 0 when it was not this deliverer's.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
