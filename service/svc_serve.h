/* `attnd serve`: runs the gRPC server until SIGTERM or SIGINT, then drains; SIGHUP reloads the
 * tenants file. `attnd token`: a new bearer token and its digest line. */
#ifndef AT_SERVICE_SVC_SERVE_H
#define AT_SERVICE_SVC_SERVE_H

/* argv[0] is "serve". Returns the exit status: 0 after a clean stop, 1 when something failed,
 * 2 for bad usage. Thread: the main thread, before any other thread exists. */
int svc_serve_main(int argc, char **argv);

/* argv[0] is "token". Prints a new token, then its quoted SHA-256 hex digest for tokens_sha256.
 * Returns 0, 1 when no random bytes could be had, 2 for bad usage. Thread: the main thread. */
int svc_token_main(int argc, char **argv);

#endif
