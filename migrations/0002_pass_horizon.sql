-- The horizon of a pass in physical order (an epoch-qualified transaction
-- ID). The pass does not count the rows it meets that are already under the
-- new key and newer than the horizon: it rewrote them itself before they
-- moved ahead of it. A resumed pass keeps the horizon of the run that
-- started it, so that the rows that run rewrote are not counted again.
-- NULL until a pass starts, and always NULL for a pass in key order.
ALTER TABLE ranges ADD COLUMN pass_horizon bigint;
