-- Done commands leave the table (it holds open commands only; the log keeps the history).
DELETE FROM commands WHERE state = 'done';
