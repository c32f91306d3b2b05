/* An in-process fake agent for the live tests: a thread serving protocol v1 on a Unix
 * socket, with knobs to restart it, stall it and change the endpoint set. */
#ifndef SLB_FAKE_AGENT_H
#define SLB_FAKE_AGENT_H

typedef struct fake_agent fake_agent;

/* Serves "web" (web-1..web-3 on 127.0.0.1:18001..) at path. */
fake_agent *fake_start(const char *path);
void fake_stop(fake_agent *f);
/* Close every connection and the listener; listen again after gap_ms. */
void fake_restart(fake_agent *f, int gap_ms);
/* web-1..web-n; watchers get the new set. */
void fake_set_endpoints(fake_agent *f, int n);
/* Answer every request delay_ms late. */
void fake_set_delay(fake_agent *f, int delay_ms);
/* The next n requests close their connection instead of being answered. */
void fake_close_on_request(fake_agent *f, int n);
int fake_connections(fake_agent *f);   /* accepted so far */
int fake_requests(fake_agent *f, const char *op);
#endif
