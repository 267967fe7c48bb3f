#include <netlink/netlink.h>
#include <netlink/route/link.h>
#include <netlink/route/addr.h>
